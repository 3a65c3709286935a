"""Records passed between the controller and rollout engines (plain dataclasses: they cross
Ray actor boundaries by pickling, and carry no tensors)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length", "abort"]


class RolloutError(RuntimeError):
    """Base of rollout failures; the message names the engine, the cause and the fix."""


class BackendUnsupportedError(RolloutError):
    """The backend cannot run this model here (architecture, head size, device)."""


class ModelDoesNotFitError(RolloutError):
    """Weights plus KV cache do not fit in the memory the engine was given."""


class EngineCrashedError(RolloutError):
    """An engine actor died (killed, out of memory, segfault) during a call."""


class EngineTimeoutError(RolloutError):
    """An engine did not answer within ``rollout.call_timeout_s``."""


@dataclass(frozen=True)
class SamplingSpec:
    """What one generate call asks of a backend (backend-neutral sampling parameters)."""

    n: int = 1
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0  # vary it per step: the same seed and prompt give the same samples
    first_index: int = 0  # batch position of the first prompt (seeds follow the prompt, not the shard)
    reasoning_budget: int | None = None  # enforced only when the prompt opened <think>
    budget_grace: float = 0.1
    top_logprobs: int = 0  # also return the k most likely tokens at every generated position
    # Token-id requests (episodes) set these per prompt: its seed index in place of first_index + p, so a
    # request's sample does not depend on how the pool batched it, and its own max_tokens.
    indices: tuple[int, ...] | None = None
    max_tokens_each: tuple[int, ...] | None = None
    # Continued completions (in-flight weight updates): per prompt, how many of its last tokens are the
    # completion's earlier tokens; the reasoning budget resumes from the state after them.
    resumed_each: tuple[int, ...] | None = None

    def index(self, p: int) -> int:
        """Seed index of prompt ``p`` of this call."""
        return self.indices[p] if self.indices is not None else self.first_index + p

    def max_tokens_of(self, p: int) -> int:
        return self.max_tokens_each[p] if self.max_tokens_each is not None else self.max_tokens

    def resumed_of(self, prompt: list[int], p: int) -> list[int]:
        """The completion's earlier tokens that end prompt ``p`` (empty for a fresh request)."""
        k = self.resumed_each[p] if self.resumed_each is not None else 0
        return prompt[len(prompt) - k :] if k else []


@dataclass(frozen=True)
class TokenRequest:
    """One generation from token ids (a turn of an episode): n=1, the prompt already rendered."""

    prompt_ids: list[int]
    thinking: bool  # the prompt opened <think>: the reasoning budget applies
    index: int  # seed index, unique in the step (see SamplingSpec.indices)
    max_tokens: int


def request_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """Seed of one sample: distinct per (prompt position, sample), the same on any engine."""
    return (seed * 1_000_003 + prompt_index * 10_007 + sample_index) % 2**63


@dataclass
class GeneratedTokens:
    """One completion as a backend returns it: tokens and per-token logprobs."""

    token_ids: list[int]
    logprobs: list[float]  # [len(token_ids)]: log p(token | prefix) under the sampling policy
    finish_reason: FinishReason
    top_logprobs: list[dict[int, float]] | None = None  # per position {token id: logprob}, when asked
    reasoning_tokens: int = 0  # tokens inside <think> (engine.generate_ids fills it)
    forced: tuple[int, ...] = ()  # positions of the budget's forced closing tag (engine.generate_ids fills it)


TopTokens = list[tuple[str, dict[str, float]]]  # per generated position: (its token's text, {text: logprob})


@dataclass
class Rollout:
    """One completion of one prompt, ready for scoring and training."""

    prompt_index: int  # position of the prompt in the generate() call
    sample_index: int  # 0 .. n-1 within that prompt
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]  # [len(token_ids)], see GeneratedTokens.logprobs
    text: str  # decoded completion (reasoning + answer), special tokens removed
    finish_reason: FinishReason
    reasoning: str | None  # None when thinking was off
    answer: str
    reasoning_closed: bool  # False when generation stopped inside <think>
    reasoning_tokens: int  # tokens inside <think> (as the budget counts them)
    engine: str = ""  # actor name that produced it, e.g. "rollout-1"
    top_tokens: TopTokens | None = None  # GenerationConfig.top_logprobs > 0: the likeliest tokens per position
    # An episode: token_ids interleave model turns and observations (logprob 0.0 on those); a reasoning
    # budget's forced closing tag is not the model's either. loss_mask is 1 exactly on tokens the model
    # sampled; None = every token is (one turn, no cut).
    loss_mask: list[int] | None = None
    turns: int = 1
    policy_version: int = 0  # the trainer's updates in the weights that sampled it (WeightUpdate.policy_version)
    # A completion continued across an in-flight weight update: (first token position, policy version) of
    # each later version; policy_version is then the oldest. Empty: one version sampled every token.
    version_changes: list[tuple[int, int]] = field(default_factory=list)

    @property
    def model_tokens(self) -> int:
        """Tokens the policy generated (observation tokens left out)."""
        return len(self.token_ids) if self.loss_mask is None else sum(self.loss_mask)


@dataclass(frozen=True)
class WeightUpdate:
    """A handle to new policy weights that every engine can apply.

    ``transport`` says how the bytes travel: ``"shm"`` = safetensors in a shared folder (works
    everywhere, one copy per host). A CUDA path (``"nccl"``/``"ipc"``) adds a transport, not a
    new caller API.
    """

    kind: Literal["full", "lora"]
    transport: str
    path: str  # folder with model.safetensors (full) or a PEFT adapter (lora)
    version: int
    num_bytes: int
    num_tensors: int
    node_id: str = ""  # Ray node whose /dev/shm holds ``path`` ("" = not known: assume the engines' own)
    policy_version: int = 0  # optimizer updates in these weights (the trainer's count; 0 = the start)


@dataclass
class SyncReport:
    """What one weight sync cost and whether the engines now agree with the trainer."""

    version: int
    kind: str
    seconds: float  # publish + apply on all engines + prefix-cache reset
    num_bytes: int
    max_abs_logprob_diff: float | None = None  # engines vs trainer on a fixed sequence
    per_engine_seconds: dict[str, float] = field(default_factory=dict)

    @property
    def bytes_per_s(self) -> float:
        return self.num_bytes / self.seconds if self.seconds > 0 else float("inf")

    def metrics(self, prefix: str = "sync/") -> dict[str, float]:
        """Flat numbers for the step log (``sync/seconds``, ``sync/max_abs_logprob_diff``, ...)."""
        out = {f"{prefix}seconds": self.seconds, f"{prefix}bytes_per_s": self.bytes_per_s,
               f"{prefix}version": float(self.version)}
        if self.max_abs_logprob_diff is not None:
            out[f"{prefix}max_abs_logprob_diff"] = self.max_abs_logprob_diff
        return out
