"""``RolloutEngine``: the body of one rollout actor (``rollout-0``, ``rollout-1``, ...).

Chat messages in, :class:`Rollout` records out, whatever the backend: prompts are rendered with
our reasoning-aware template, the thinking budget is enforced while generating, completions are
split into reasoning and answer here (one code path for both backends). Runs in-process too,
which is how unit tests and the benchmark's reference use it.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from posttrain import chat_template, models
from posttrain.config import GenerationConfig, ModelConfig, RolloutConfig
from posttrain.errors import ConfigError
from posttrain.rollout.budget import BudgetSpec, replay_budget, trained_mask
from posttrain.rollout.types import (
    BackendUnsupportedError,
    GeneratedTokens,
    ModelDoesNotFitError,
    Rollout,
    RolloutError,
    SamplingSpec,
    TokenRequest,
    TopTokens,
    WeightUpdate,
)
from posttrain.rollout.weight_sync import current_node_id, unpack

log = logging.getLogger(__name__)
_NO_BUDGET = 10**9  # "count reasoning tokens, never force"


@dataclass(frozen=True)
class EngineInfo:
    name: str
    backend: str  # the backend actually running: "vllm" | "transformers"
    model_dir: str
    fallback_reason: str | None  # why vLLM was not used, when it was configured
    start_seconds: float
    pid: int
    node_id: str = ""  # Ray node it runs on ("" outside Ray)


class RolloutEngine:
    """One generation engine with a fixed interface over the vLLM and transformers backends."""

    def __init__(self, model: ModelConfig, cfg: RolloutConfig, rank: int = 0, name: str | None = None,
                 *, start: bool = True) -> None:
        """``start=False`` defers loading to :meth:`start` (the pool does this, so a start-up failure
        reaches the caller as its own exception type instead of a generic dead-actor error)."""
        self.name = name or f"rollout-{rank}"
        self.model_cfg, self.cfg, self.rank = model, cfg, rank
        if start:
            self.start()

    def start(self) -> EngineInfo:
        """Load tokenizer and backend (vLLM, or transformers as configured / as fallback)."""
        start = time.perf_counter()
        model, cfg, rank = self.model_cfg, self.cfg, self.rank
        self.model_dir = models.resolve(model.name)
        check_fits(self.model_dir, cfg)
        self.tokenizer = models.tokenizer_for(model.model_copy(update={"name": self.model_dir}))
        self.backend, self.fallback_reason = _make_backend(self.model_dir, model, cfg, rank)
        self._specs: dict[tuple[int, float], BudgetSpec] = {}
        self._info = EngineInfo(self.name, self.backend.name, self.model_dir, self.fallback_reason,
                                time.perf_counter() - start, os.getpid(), current_node_id())
        self._remote_copy: str | None = None
        log.info("%s: %s backend on %s ready in %.1f s", self.name, self.backend.name, self.model_dir,
                 self._info.start_seconds)
        return self._info

    def info(self) -> EngineInfo:
        return self._info

    def generate(self, prompts: list[chat_template.Messages], gen: GenerationConfig, n: int = 1,
                 first_index: int = 0) -> list[list[Rollout]]:
        """``n`` completions per prompt; ``first_index`` numbers prompts when a pool splits a batch."""
        if n < 1:
            raise ValueError(f"samples per prompt must be >= 1 (got {n})")
        if not prompts:
            return []
        thinking = [chat_template.thinking_enabled(m, gen.enable_thinking) for m in prompts]
        prompt_ids = [self._encode(m, gen) for m in prompts]
        too_long = [i for i, p in enumerate(prompt_ids) if len(p) + gen.max_new_tokens > self.cfg.max_model_len]
        if too_long:
            i = too_long[0]
            raise ConfigError(f"prompt {first_index + i} has {len(prompt_ids[i])} tokens; with max_new_tokens="
                              f"{gen.max_new_tokens} it exceeds rollout.max_model_len={self.cfg.max_model_len}")
        spec = SamplingSpec(n=n, max_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
                            seed=gen.seed, first_index=first_index, reasoning_budget=gen.reasoning_budget,
                            budget_grace=self.cfg.budget_grace, top_logprobs=gen.top_logprobs)
        samples = self.backend.generate(prompt_ids, spec, thinking)
        return [[self._rollout(first_index + p, i, prompt_ids[p], s, thinking[p], gen)
                 for i, s in enumerate(per_prompt)] for p, per_prompt in enumerate(samples)]

    def generate_ids(self, requests: list[TokenRequest], gen: GenerationConfig) -> list[GeneratedTokens]:
        """One completion per token-id prompt (the turns of episodes): no rendering here, the caller
        owns the tokens. Each request brings its seed index and max_tokens; ``gen`` the sampling."""
        if not requests:
            return []
        too_long = [r for r in requests if r.max_tokens < 1 or len(r.prompt_ids) + r.max_tokens > self.cfg.max_model_len]
        if too_long:
            r = too_long[0]
            raise ConfigError(f"request {r.index}: {len(r.prompt_ids)} prompt tokens + max_tokens={r.max_tokens} must fit "
                              f"rollout.max_model_len={self.cfg.max_model_len} (and max_tokens >= 1)")
        spec = SamplingSpec(n=1, max_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
                            seed=gen.seed, reasoning_budget=gen.reasoning_budget, budget_grace=self.cfg.budget_grace,
                            indices=tuple(r.index for r in requests),
                            max_tokens_each=tuple(r.max_tokens for r in requests))
        samples = self.backend.generate([list(r.prompt_ids) for r in requests], spec, [r.thinking for r in requests])
        out = [s[0] for s in samples]
        for r, s in zip(requests, out):
            if r.thinking:
                budget = gen.reasoning_budget if gen.reasoning_budget is not None else _NO_BUDGET
                s.reasoning_tokens, forced = replay_budget(self._spec(budget), self._decode, s.token_ids)
                s.forced = tuple(forced)
        return out

    def extend(self, partials: list[Rollout], gen: GenerationConfig, max_tokens: list[int],
               indices: list[int]) -> list[Rollout]:
        """Continue completions that were cut short (in-flight weight updates): each one's prompt and
        tokens go in as the prompt, up to ``max_tokens[k]`` more tokens come out under the weights the
        engine holds now, and the result is the whole completion as one :class:`Rollout` (the reasoning
        budget resumes in the state it was in; each token keeps the logprob of the weights that sampled
        it). ``indices``: each request's seed index, unique in the step."""
        if not partials:
            return []
        prompts = [list(r.prompt_ids) + list(r.token_ids) for r in partials]
        if any(len(p) + m > self.cfg.max_model_len for p, m in zip(prompts, max_tokens)):
            raise ConfigError(f"a continued completion exceeds rollout.max_model_len={self.cfg.max_model_len}")
        thinking = [r.reasoning is not None for r in partials]
        spec = SamplingSpec(n=1, max_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
                            seed=gen.seed, reasoning_budget=gen.reasoning_budget, budget_grace=self.cfg.budget_grace,
                            top_logprobs=gen.top_logprobs, indices=tuple(indices), max_tokens_each=tuple(max_tokens),
                            resumed_each=tuple(len(r.token_ids) for r in partials))
        out = []
        for r, (s,), think in zip(partials, self.backend.generate(prompts, spec, thinking), thinking):
            whole = GeneratedTokens(list(r.token_ids) + s.token_ids, list(r.logprobs) + s.logprobs, s.finish_reason)
            new = self._rollout(r.prompt_index, r.sample_index, list(r.prompt_ids), whole, think, gen)
            if s.top_logprobs is not None:
                new.top_tokens = (r.top_tokens or []) + self._top_tokens(s)
            new.policy_version, new.version_changes = r.policy_version, list(r.version_changes)
            out.append(new)
        return out

    def score(self, sequences: list[list[int]], starts: list[int]) -> list[list[float]]:
        """Teacher-forced logprobs of ``seq[start:]`` under the current weights (raw, temperature 1)."""
        return self.backend.score(sequences, starts)

    def apply_weights(self, update: WeightUpdate, files: dict[str, bytes] | None = None) -> float:
        """Load a staged update without restarting; returns the seconds it took.

        ``files``: the update's bytes, when it was staged on another node (Ray moved them here);
        they are written to this node's ``rollout.sync_dir`` first. A LoRA copy stays while live.
        """
        start = time.perf_counter()
        previous, self._remote_copy = self._remote_copy, None
        if files is not None:
            update = unpack(update, files, self.cfg.sync_dir)
            self._remote_copy = update.path
        try:
            self.backend.apply(update)
        finally:
            for folder in (previous, self._remote_copy if update.kind == "full" else None):
                if folder:
                    shutil.rmtree(folder, ignore_errors=True)
            if update.kind == "full":
                self._remote_copy = None
        return time.perf_counter() - start

    def weight_transfer(self, step: str, payload: dict[str, Any] | None = None) -> None:
        """A step of the direct weight sync the trainer drives (``posttrain.rollout.transfer.EngineClient``)."""
        transfer = getattr(self.backend, "weight_transfer", None)
        if transfer is None:
            raise RolloutError(f"{self.name}: the {self.backend.name} backend takes weights through shm only "
                               "(rollout.sync_transport=shm)")
        transfer(step, payload)

    def sleep(self, level: int = 1) -> float:
        """Give the device's memory back between generations (``run.colocate``); seconds it took."""
        start = time.perf_counter()
        self.backend.sleep(level)
        return time.perf_counter() - start

    def wake(self) -> float:
        start = time.perf_counter()
        self.backend.wake()
        return time.perf_counter() - start

    def shutdown(self) -> None:
        self.backend.shutdown()

    def _encode(self, messages: chat_template.Messages, gen: GenerationConfig) -> list[int]:
        if self.model_cfg.chat_template == "posttrain":
            text = chat_template.render(self.tokenizer, messages, add_generation_prompt=True,
                                        enable_thinking=gen.enable_thinking, reasoning_budget=gen.reasoning_budget)
        else:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def _rollout(self, p: int, i: int, prompt_ids: list[int], s: GeneratedTokens, thinking: bool,
                 gen: GenerationConfig) -> Rollout:
        text = self.tokenizer.decode(s.token_ids, skip_special_tokens=True)
        split = chat_template.split_reasoning(text, started_in_reasoning=thinking)
        n_reasoning, forced = 0, []
        if thinking:
            budget = gen.reasoning_budget if gen.reasoning_budget is not None else _NO_BUDGET
            n_reasoning, forced = replay_budget(self._spec(budget), self._decode, s.token_ids)
        mask = trained_mask(len(s.token_ids), forced) if forced else None
        return Rollout(prompt_index=p, sample_index=i, prompt_ids=prompt_ids, token_ids=s.token_ids,
                       logprobs=s.logprobs, text=text, finish_reason=s.finish_reason,
                       reasoning=split.reasoning if thinking else None, answer=split.answer,
                       reasoning_closed=split.reasoning_closed, reasoning_tokens=n_reasoning, engine=self.name,
                       top_tokens=self._top_tokens(s) if s.top_logprobs is not None else None,
                       loss_mask=mask)  # the budget's forced closing tag: written for the policy, not by it

    def _top_tokens(self, s: GeneratedTokens) -> TopTokens:
        """Token ids of the sample and of its alternatives as text (one decode per distinct id); ids
        that decode alike (e.g. partial UTF-8 bytes) share one entry holding their summed probability."""
        ids = sorted({*s.token_ids, *(t for top in s.top_logprobs or [] for t in top)})
        text = dict(zip(ids, self.tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False)))
        out: TopTokens = []
        for token, top in zip(s.token_ids, s.top_logprobs or []):
            merged: dict[str, float] = {}
            for alt, logprob in top.items():
                key = text[alt]
                merged[key] = logprob if key not in merged else float(np.logaddexp(merged[key], logprob))
            out.append((text[token], merged))
        return out

    def _spec(self, budget: int) -> BudgetSpec:
        key = (budget, self.cfg.budget_grace)
        if key not in self._specs:
            self._specs[key] = BudgetSpec.build(self.tokenizer, budget, self.cfg.budget_grace)
        return self._specs[key]

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)


def _make_backend(model_dir: str, model: ModelConfig, cfg: RolloutConfig, rank: int) -> tuple[Any, str | None]:
    """The configured backend, or transformers when vLLM cannot run this model and fallback is on."""
    from posttrain.rollout.backend_hf import HFBackend

    if cfg.backend == "transformers":
        return HFBackend(model_dir, model, cfg, rank), None
    try:
        from posttrain.rollout.backend_vllm import VLLMBackend

        return VLLMBackend(model_dir, model, cfg, rank), None
    except (BackendUnsupportedError, ImportError) as exc:
        if not cfg.fallback_to_transformers:
            raise
        log.warning("vLLM cannot run %s (%s); falling back to transformers", model_dir, exc)
        return HFBackend(model_dir, model, cfg, rank), str(exc)


def check_fits(model_dir: str, cfg: RolloutConfig) -> None:
    """Refuse early when weights + KV cache exceed the memory available (CPU only)."""
    from posttrain.rollout.backend_vllm import on_cuda

    if on_cuda() or not Path(model_dir).is_dir():
        return
    weights = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors")) or \
        sum(f.stat().st_size for f in Path(model_dir).glob("*.bin"))
    need = weights + (cfg.kv_cache_gib * 2**30 if cfg.backend == "vllm" else 0)
    avail = _available_bytes()
    if avail is not None and need > avail:
        raise ModelDoesNotFitError(
            f"{model_dir}: weights {weights / 2**30:.1f} GiB + KV cache rollout.kv_cache_gib={cfg.kv_cache_gib:g} GiB "
            f"exceed the {avail / 2**30:.1f} GiB of available memory; lower rollout.kv_cache_gib or use fewer engines")


def _available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None
