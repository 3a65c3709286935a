"""The environment protocol: samples in, a reward out.

An environment yields :class:`Sample` records (prompt messages + gold answer + metadata) and
scores a model's answer into a :class:`Score`. That is all a plug-in has to provide (see the
README's worked example); the optional hooks of :class:`Environment` -- start, close, roles,
state -- have defaults (:class:`DefaultHooks`). The completion an environment scores is the **answer part** (the
text after ``</think>``; the whole text when thinking was off): reasoning never earns reward.

Scoring runs on hostile text. :func:`score_safely` is the one place the loop calls: whatever
an environment does (raise, hang, return junk), the result is a finite reward in [0, 1]
-- 0 on any failure -- with a :class:`ScoreKind` that says what went wrong (metrics count
kinds; the loop trains only verdicts) and an ``error`` text that says it to a person.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from posttrain.errors import ServiceError

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Sample:
    """One prompt of an environment."""

    id: str
    messages: Messages
    answer: Any = None  # gold answer, unit tests, constraints, schema...
    info: dict[str, Any] = field(default_factory=dict)  # difficulty, source row, ...


class ScoreKind(StrEnum):
    """What a score is: a verdict on the completion, or why there is none. Code decides on this,
    never on the ``error`` text."""

    OK = "ok"  # the environment judged the completion (any reward)
    INVALID = "invalid"  # no gradable answer in it (empty, no final answer, bad format): reward 0, a verdict
    ENV_ERROR = "env_error"  # the environment failed on it (raised, hung, returned junk, a sample it cannot use)
    INFRA = "infra"  # the machinery failed (sandbox, checker process, judge outage, a broken gold answer)

    @property
    def trained(self) -> bool:
        """Everything but ``infra`` is trained. An ``env_error`` is trained at reward 0: the completion
        broke or hung its environment, and excluding it would let a policy dodge a low reward by
        breaking its judge. Infra failures say nothing about the completion."""
        return self is not ScoreKind.INFRA


@dataclass
class Score:
    """A reward in [0, 1] and what kind of score it is; ``error`` is the free-text detail for people.

    A score with an ``error`` and no ``kind`` is ``invalid`` (the completion's fault), so a plug-in's
    ``Score(0.0, error="no answer")`` means what it says.
    """

    reward: float
    metrics: dict[str, float] = field(default_factory=dict)  # logged as env/<name>/<key>
    error: str | None = None  # detail: "no final answer", "KeyError: 'x'", "sandbox actor died", ...
    kind: ScoreKind = ScoreKind.OK

    def __post_init__(self) -> None:
        if self.error is not None and self.kind is ScoreKind.OK:
            self.kind = ScoreKind.INVALID

    @classmethod
    def failed(cls, kind: ScoreKind, error: str, metrics: dict[str, float] | None = None) -> Score:
        """Reward 0 for a completion that got no verdict, or an invalid one."""
        return cls(0.0, dict(metrics or {}), error, kind)


@dataclass(frozen=True)
class StageResources:
    """What a stage lends the environments it starts."""

    placement: Any = None  # the stage's placement group, with bundles for the roles an environment asked for
    code_runner: Any = None  # where untrusted programs run (posttrain.verifiers.service.CodeRunner): the
    #                          stage's sandbox-N actors with its sandbox limits; None = this process, default limits


@runtime_checkable
class Environment(Protocol):
    """An environment: ``name``, ``samples`` and ``score`` are the plug-in's to write; the rest are
    hooks with defaults (:class:`DefaultHooks`), which ``load_environment`` gives any environment
    that leaves them out."""

    name: str
    sandboxed: bool  # runs untrusted programs: the stage starts its sandbox-N actors (default False)
    eval_metrics: tuple[str, ...]  # score metrics whose means held-out evaluation also reports (default ())

    def samples(self, split: str, seed: int) -> Sequence[Sample]:
        """The prompts of ``split`` ("train" or "test"); deterministic for a seed."""
        ...

    async def score(self, sample: Sample, completion: str) -> Score:
        """Reward of ``completion`` (the answer part) for ``sample``."""
        ...

    def gold_answer(self, sample: Sample) -> str | None:
        """A completion that must score 1.0 (``env check``, the GenRM warm-up); None: the data has none."""
        ...

    def roles(self) -> dict[str, list[dict[str, float]]]:
        """Ray bundles of the actors the environment starts itself (a GenRM's engines), by role."""
        ...

    def start(self, resources: StageResources) -> None:
        """Called by a stage before it scores: start own actors in ``resources.placement``, keep
        ``resources.code_runner`` for programs. Unstarted, an environment scores in this process."""
        ...

    def close(self) -> None:
        """Release what the environment started (processes, actors); safe to call more than once.
        Whoever loads environments closes them (``posttrain.environments.registry.opened``)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """JSON data a resumed run needs to score as an uninterrupted one (RNGs, counters); saved
        in every RL checkpoint and given back through :meth:`load_state_dict` on resume."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class DefaultHooks:
    """The hooks' defaults: nothing to start, release or restore; the gold answer is ``sample.answer``.
    Built-ins inherit them; a plug-in may too (or write its own, or leave them to ``load_environment``)."""

    sandboxed: bool = False
    eval_metrics: tuple[str, ...] = ()

    def gold_answer(self, sample: Sample) -> str | None:
        return None if sample.answer is None else str(sample.answer)

    def roles(self) -> dict[str, list[dict[str, float]]]:
        return {}

    def start(self, resources: StageResources) -> None:
        """Nothing to start."""

    def close(self) -> None:
        """Nothing to release."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Nothing to restore."""


HOOKS = ("sandboxed", "eval_metrics", "gold_answer", "roles", "start", "close", "state_dict", "load_state_dict")


async def score_safely(env: Environment, sample: Sample, completion: Any, timeout: float = 60.0) -> Score:
    """Score with every failure turned into reward 0 plus a kind and a detail; never raises."""
    if not isinstance(completion, str):  # the pipeline handed over no text: nothing was judged
        return Score.failed(ScoreKind.INFRA, f"completion is a {type(completion).__name__}, not text")
    try:
        score = await asyncio.wait_for(env.score(sample, completion), timeout)
    except asyncio.TimeoutError:
        return Score.failed(ScoreKind.ENV_ERROR, f"timeout: no score within {timeout:g}s")
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - the environment's bug must not kill the step
        return Score.failed(ScoreKind.ENV_ERROR, f"crash: {type(exc).__name__}: {str(exc)[:200]}")
    return checked(score)


def checked(score: Any) -> Score:
    """``score`` if it is a Score with a finite reward (clamped into [0, 1]); else reward 0 + env_error."""
    if not isinstance(score, Score):
        return Score.failed(ScoreKind.ENV_ERROR, f"score() returned a {type(score).__name__}, not a Score")
    reward = score.reward
    if not isinstance(reward, (int, float)) or isinstance(reward, bool) or not math.isfinite(reward):
        return Score.failed(ScoreKind.ENV_ERROR, f"bad reward {reward!r:.40}", score.metrics)
    kind = score.kind if isinstance(score.kind, ScoreKind) else ScoreKind.ENV_ERROR
    return Score(min(1.0, max(0.0, float(reward))), score.metrics, score.error, kind)


@dataclass(frozen=True)
class Completion:
    """One rollout as a group-scoring environment sees it (answer part plus lengths)."""

    answer: str
    reasoning: str | None = None
    reasoning_tokens: int = 0
    answer_tokens: int = 0


@runtime_checkable
class GroupEnvironment(Protocol):
    """An environment whose rewards compare the rollouts of one prompt with each other (a GenRM).

    It scores every group of a step in one call, so a judge can batch all its comparisons into
    one generation; ``groups[i]`` are the rollouts of ``samples[i]``.
    """

    name: str

    def samples(self, split: str, seed: int) -> Sequence[Sample]: ...

    async def score_groups(self, samples: Sequence[Sample],
                           groups: Sequence[Sequence[Completion]]) -> list[list[Score]]: ...


async def score_groups_safely(env: GroupEnvironment, samples: Sequence[Sample],
                              groups: Sequence[Sequence[Completion]], timeout: float) -> list[list[Score]]:
    """``env.score_groups`` with every failure turned into reward 0 + env_error for the whole step."""

    def failed(error: str) -> list[list[Score]]:
        return [[Score.failed(ScoreKind.ENV_ERROR, error) for _ in group] for group in groups]

    try:
        result = await asyncio.wait_for(env.score_groups(samples, groups), timeout)
    except asyncio.TimeoutError:
        return failed(f"timeout: no scores within {timeout:g}s")
    except (asyncio.CancelledError, ServiceError):  # a stop on purpose (a judge that stays down), not a bug
        raise
    except Exception as exc:  # noqa: BLE001 - the environment's bug must not kill the step
        return failed(f"crash: {type(exc).__name__}: {str(exc)[:200]}")
    shape_ok = isinstance(result, list) and len(result) == len(groups) and all(
        isinstance(r, list) and len(r) == len(g) for r, g in zip(result, groups))
    if not shape_ok:
        return failed("score_groups() returned scores that do not match the groups' shape")
    return [[checked(s) for s in scores] for scores in result]


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


def rng_state(rng: random.Random) -> list[Any]:
    """``rng``'s state as JSON data (checkpoints are JSON): for an environment's ``state_dict``."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def restore_rng(rng: random.Random, state: Sequence[Any]) -> None:
    """Put ``rng`` back in a state from :func:`rng_state` (or ``getstate()`` after a JSON round trip)."""
    version, internal, gauss = state
    rng.setstate((version, tuple(internal), gauss))


def user_prompt(text: str, system: str | None = None) -> Messages:
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
