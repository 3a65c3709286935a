"""GenRM judge backends: send judge conversations to a model, get raw completions back.

Two backends behind one protocol: ``local`` (the GenRM on our own rollout engines, one batched
``pool.generate`` call) and ``openai`` (an OpenAI-compatible endpoint such as ``vllm serve``; see
:mod:`posttrain.genrm.openai_backend`), both speaking the types of :mod:`posttrain.genrm.judge`.
Backends never parse: the judge format does that. A call that fails after its retries comes back
as ``text=None`` with an error code, never as an exception, so one bad judge call cannot stop a
training step.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any

from posttrain.config import GenerationConfig
from posttrain.errors import ConfigError
from posttrain.genrm.judge import Conversation, JudgeBackend, JudgeCall, JudgeConfig


def judge_generation(cfg: JudgeConfig) -> GenerationConfig:
    """The judge's sampling settings as a GenerationConfig for the local engines."""
    return GenerationConfig(max_new_tokens=cfg.max_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            enable_thinking=cfg.enable_thinking, seed=cfg.seed or 0,
                            top_logprobs=cfg.top_logprobs if cfg.scoring == "expected" else 0)


class LocalJudge:
    """The GenRM on a rollout pool (anything with ``generate(prompts, gen, n)``): one batched call.

    The seed moves on by one per batch, as the policy's does per step, so a repeated comparison is
    sampled afresh while the run stays reproducible.
    """

    def __init__(self, pool: Any, generation: GenerationConfig) -> None:
        if not callable(getattr(pool, "generate", None)):
            raise TypeError(f"LocalJudge needs a pool with generate(prompts, gen, n) (got {type(pool).__name__})")
        self.pool = pool
        self.generation = generation
        self._batches = 0

    def complete(self, batch: list[Conversation]) -> list[JudgeCall]:
        """One ``pool.generate(batch, gen, n=1)``; engine errors fail every call, never raise."""
        if not batch:
            return []
        gen = self.generation.model_copy(update={"seed": self.generation.seed + self._batches})
        self._batches += 1
        start = time.perf_counter()
        try:
            groups = self.pool.generate([list(m) for m in batch], gen, n=1)
        except Exception as exc:  # noqa: BLE001 - an engine failure is a failed batch, not a crash
            detail = f"{type(exc).__name__}: {exc}"[:500]
            return [JudgeCall(None, _engine_error(exc), 1, time.perf_counter() - start, detail) for _ in batch]
        seconds = time.perf_counter() - start
        if not isinstance(groups, list) or len(groups) != len(batch):
            got = len(groups) if isinstance(groups, list) else type(groups).__name__
            detail = f"pool returned {got} groups for {len(batch)} prompts"
            return [JudgeCall(None, "bad_engine_output", 1, seconds, detail) for _ in batch]
        return [call_of(group, seconds) for group in groups]

    def close(self) -> None:
        """The pool belongs to the caller (it may be the policy's): nothing to release here."""

    def state_dict(self) -> dict[str, Any]:
        return {"batches": self._batches}  # the next batch's seed offset

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._batches = int(state["batches"])

    def __enter__(self) -> LocalJudge:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def call_of(group: Any, seconds: float = 0.0) -> JudgeCall:
    """JudgeCall from one prompt's rollouts (n=1); a malformed group fails only that call."""
    rollout = group[0] if isinstance(group, (list, tuple)) and group else None
    text = getattr(rollout, "text", None)
    if not isinstance(text, str):
        return JudgeCall(None, "bad_engine_output", 1, seconds, f"no rollout text in {type(group).__name__}")
    token_ids = getattr(rollout, "token_ids", None)
    return JudgeCall(text, None, 1, seconds, finish_reason=getattr(rollout, "finish_reason", None),
                     tokens=len(token_ids) if isinstance(token_ids, list) else 0,
                     top_tokens=getattr(rollout, "top_tokens", None))


def _engine_error(exc: Exception) -> str:
    from posttrain.rollout.types import EngineCrashedError, EngineTimeoutError

    if isinstance(exc, EngineTimeoutError):
        return "timeout"
    if isinstance(exc, EngineCrashedError):
        return "engine_crashed"
    return "engine_error"


def judge_backend(cfg: JudgeConfig, pool: Any | None = None,
                  generation: GenerationConfig | None = None) -> JudgeBackend:
    """The backend ``cfg`` asks for; ``pool`` (the engines running the GenRM) is needed for local."""
    if cfg.backend == "openai":
        from posttrain.genrm.openai_backend import OpenAIJudge

        return OpenAIJudge(cfg)
    if cfg.base_url is not None:
        raise ConfigError(f"judge.base_url is set ({cfg.base_url!r}) but judge.backend='local'; "
                          "set judge.backend=openai to use that server, or unset base_url")
    if cfg.extra_body or cfg.headers:
        raise ConfigError("judge.extra_body / judge.headers apply to backend=openai only; "
                          "for backend=local pass a GenerationConfig, or set judge.backend=openai")
    if pool is None:
        raise ConfigError("judge.backend='local' needs a rollout pool running the GenRM "
                          "(judge_backend(cfg, pool=RolloutPool(...))), or set judge.backend=openai "
                          "and judge.base_url=http://HOST:PORT/v1 to use a served GenRM")
    return LocalJudge(pool, generation if generation is not None else judge_generation(cfg))


def summarize(calls: list[JudgeCall], prefix: str = "genrm/") -> dict[str, float]:
    """Per-batch judge metrics: calls, failures, retries, time, truncations, and a count per error code."""
    n = len(calls)
    failures = sum(1 for c in calls if c.text is None)
    out = {
        f"{prefix}calls": float(n),
        f"{prefix}call_failures": float(failures),
        f"{prefix}call_failure_rate": failures / n if n else 0.0,
        f"{prefix}retries": float(sum(max(c.attempts - 1, 0) for c in calls)),
        f"{prefix}call_seconds_mean": sum(c.seconds for c in calls) / n if n else 0.0,
        f"{prefix}call_seconds_max": max((c.seconds for c in calls), default=0.0),
        f"{prefix}truncated": float(sum(1 for c in calls if c.finish_reason == "length")),
        f"{prefix}completion_tokens_mean": sum(c.tokens for c in calls) / n if n else 0.0,
    }
    for code, count in sorted(Counter(c.error for c in calls if c.error).items()):
        out[f"{prefix}errors/{code}"] = float(count)
    return out
