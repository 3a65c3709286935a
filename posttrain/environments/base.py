"""The environment protocol: samples in, a reward out.

An environment yields :class:`Sample` records (prompt messages + gold answer + metadata) and
scores a model's answer into a :class:`Score`. That is all a plug-in has to provide; see the
README's worked example. The completion an environment scores is the **answer part** (the
text after ``</think>``; the whole text when thinking was off): reasoning never earns reward.

Scoring runs on hostile text. :func:`score_safely` is the one place the loop calls: whatever
an environment does (raise, hang, return junk), the result is a finite reward in [0, 1]
-- 0 on any failure -- and an ``error`` string that metrics count.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Sample:
    """One prompt of an environment."""

    id: str
    messages: Messages
    answer: Any = None  # gold answer, unit tests, constraints, schema...
    info: dict[str, Any] = field(default_factory=dict)  # difficulty, source row, ...


@dataclass
class Score:
    reward: float
    metrics: dict[str, float] = field(default_factory=dict)  # logged as env/<name>/<key>
    error: str | None = None  # "timeout", "sandbox", "parse", "crash:<Type>", ...


@runtime_checkable
class Environment(Protocol):
    name: str

    def samples(self, split: str, seed: int) -> Sequence[Sample]:
        """The prompts of ``split`` ("train" or "test"); deterministic for a seed."""
        ...

    async def score(self, sample: Sample, completion: str) -> Score:
        """Reward of ``completion`` (the answer part) for ``sample``."""
        ...


async def score_safely(env: Environment, sample: Sample, completion: Any, timeout: float = 60.0) -> Score:
    """Score with every failure turned into reward 0 plus a named error; never raises."""
    if not isinstance(completion, str):
        return Score(0.0, error=f"bad_completion:{type(completion).__name__}")
    try:
        score = await asyncio.wait_for(env.score(sample, completion), timeout)
    except asyncio.TimeoutError:
        return Score(0.0, error="timeout")
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - the environment's bug must not kill the step
        return Score(0.0, error=f"crash:{type(exc).__name__}: {str(exc)[:200]}")
    if not isinstance(score, Score):
        return Score(0.0, error=f"bad_score_type:{type(score).__name__}")
    reward = score.reward
    if not isinstance(reward, (int, float)) or isinstance(reward, bool) or not math.isfinite(reward):
        return Score(0.0, metrics=score.metrics, error=f"bad_reward:{reward!r:.40}")
    return Score(min(1.0, max(0.0, float(reward))), score.metrics, score.error)


async def score_batch(env: Environment, samples: Sequence[Sample], completions: Sequence[Any],
                      concurrency: int = 8, timeout: float = 60.0) -> list[Score]:
    """Score pairs concurrently (bounded), in order."""
    if len(samples) != len(completions):
        raise ValueError(f"{len(samples)} samples but {len(completions)} completions")
    gate = asyncio.Semaphore(max(1, concurrency))

    async def one(sample: Sample, completion: Any) -> Score:
        async with gate:
            return await score_safely(env, sample, completion, timeout)

    return list(await asyncio.gather(*(one(s, c) for s, c in zip(samples, completions))))


def user_prompt(text: str, system: str | None = None) -> Messages:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
