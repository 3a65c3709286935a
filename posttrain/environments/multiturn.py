"""Multi-turn environments: an episode of turns in which the environment talks back.

A single-turn :class:`~posttrain.environments.base.Environment` scores one completion; a
:class:`MultiTurnEnvironment` plays an episode::

    episode = await env.reset(sample)                 # the conversation starts from sample.messages
    while True:
        turn = <the model's next assistant turn>       # parsed: answer text, reasoning, tool calls
        obs = await env.step(episode, turn)            # tool results / a reply, or done with a Score
        if obs.done: break

The rollout side (``posttrain.rollout.episodes``) keeps the tokens: each turn's prompt is the
previous prompt + the generated tokens + the tokenised observation, never a re-render, and only
model tokens train. The environment sees messages, never tokens.

Hostile or failing environments keep the single-turn guarantees: :func:`reset_safely` and
:func:`step_safely` are the only calls the runner makes, and any exception, hang or bad value
ends the episode at reward 0 with a counted ``env_error``. An episode cut by a limit (turns,
tokens) before the environment said ``done`` scores 0 as ``invalid``.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from posttrain.environments.base import Messages, Sample, Score, ScoreKind, checked

OBSERVATION_ROLES = ("tool", "user")  # who may speak between two assistant turns
MAX_OBSERVATION_CHARS = 64_000  # per step, all messages together: a flood is an environment error


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: a tool's name and its JSON arguments."""

    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class AssistantTurn:
    """One assistant turn as an environment sees it (parsed from hostile model text)."""

    content: str  # the answer part with the <tool_call> blocks taken out
    reasoning: str | None  # None when thinking was off
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_errors: tuple[str, ...] = ()  # malformed <tool_call> blocks, each said in a line
    text: str = ""  # the whole turn as generated (reasoning + answer), special tokens removed
    finish_reason: str = "stop"  # "length" when the turn was cut at max_new_tokens


@dataclass
class Episode:
    """An episode in progress: the sample, the conversation as messages and the environment's own state."""

    sample: Sample
    messages: Messages  # sample.messages, then every assistant turn and observation, in order
    turn: int = 0  # assistant turns taken so far
    state: dict[str, Any] = field(default_factory=dict)  # the environment's (a game's secret, a session id)


@dataclass
class Observation:
    """What the environment answers to one turn.

    Not done: ``messages`` (``tool`` results or a ``user`` reply) are what the model sees next. Done:
    ``score`` is the episode's reward (None = reward 0, ``invalid``); ``messages`` are ignored.
    """

    messages: Messages = field(default_factory=list)
    done: bool = False
    score: Score | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # per-turn counts, summed over the episode
    errors: tuple[str, ...] = ()  # problems the model caused this turn (a malformed call, a failed tool), counted


@runtime_checkable
class MultiTurnEnvironment(Protocol):
    """``name``, ``samples``, ``reset`` and ``step`` are the plug-in's to write; ``tools`` and
    ``max_turns`` are data; the hooks of :class:`~posttrain.environments.base.DefaultHooks` apply too
    (``gold_answer`` aside: a multi-turn environment scripts a whole gold episode instead)."""

    name: str
    tools: Sequence[dict[str, Any]]  # OpenAI-style {"type": "function", "function": {name, description, parameters}}
    max_turns: int  # assistant turns before the episode is cut (the stage may lower it)

    def samples(self, split: str, seed: int) -> Sequence[Sample]: ...

    async def reset(self, sample: Sample) -> Episode: ...

    async def step(self, episode: Episode, turn: AssistantTurn) -> Observation: ...

    def gold_episode(self, sample: Sample) -> list[str] | None:
        """Assistant turns (text as a model would write it) that must end the episode at reward 1.0,
        given the environment's replies (``env check``); None: no scripted solution."""
        ...


def is_multiturn(env: Any) -> bool:
    return callable(getattr(env, "reset", None)) and callable(getattr(env, "step", None))


async def reset_safely(env: MultiTurnEnvironment, sample: Sample, timeout: float) -> Episode | Score:
    """The new episode, or the reward-0 Score that ends it before it starts; never raises."""
    try:
        episode = await asyncio.wait_for(env.reset(sample), timeout)
    except asyncio.TimeoutError:
        return Score.failed(ScoreKind.ENV_ERROR, f"timeout: reset() took over {timeout:g}s")
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - the environment's bug costs this episode only
        return Score.failed(ScoreKind.ENV_ERROR, f"crash in reset(): {type(exc).__name__}: {str(exc)[:200]}")
    if not isinstance(episode, Episode):
        return Score.failed(ScoreKind.ENV_ERROR, f"reset() returned a {type(episode).__name__}, not an Episode")
    return episode


async def step_safely(env: MultiTurnEnvironment, episode: Episode, turn: AssistantTurn, timeout: float) -> Observation:
    """``env.step`` with every failure turned into a finished episode at reward 0 + env_error."""
    try:
        obs = await asyncio.wait_for(env.step(episode, turn), timeout)
    except asyncio.TimeoutError:
        return ended(ScoreKind.ENV_ERROR, f"timeout: step() took over {timeout:g}s")
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001
        return ended(ScoreKind.ENV_ERROR, f"crash in step(): {type(exc).__name__}: {str(exc)[:200]}")
    return checked_observation(obs)


def checked_observation(obs: Any) -> Observation:
    """``obs`` if it is well formed (done with a checked score, or messages the model can read); else the
    episode ends at reward 0 + env_error. Metrics keep only finite numbers."""
    if not isinstance(obs, Observation):
        return ended(ScoreKind.ENV_ERROR, f"step() returned a {type(obs).__name__}, not an Observation")
    metrics = _finite_metrics(obs.metrics)
    raw_errors = obs.errors if isinstance(obs.errors, (list, tuple)) else ([obs.errors] if obs.errors else [])
    errors = tuple(str(e)[:300] for e in raw_errors[:16])
    if obs.done:
        score = Score.failed(ScoreKind.INVALID, "episode ended without a score") if obs.score is None else checked(obs.score)
        return Observation([], True, score, metrics, errors)
    problem = _bad_messages(obs.messages)
    if problem:
        return ended(ScoreKind.ENV_ERROR, problem)
    return Observation([{"role": m["role"], "content": m["content"], **({"name": m["name"]} if isinstance(
        m.get("name"), str) else {})} for m in obs.messages], False, None, metrics, errors)


def _finite_metrics(metrics: Any) -> dict[str, float]:
    """The finite numbers of an environment's metrics dict (anything else is dropped, never raised on)."""
    out: dict[str, float] = {}
    for key, value in (metrics.items() if isinstance(metrics, dict) else ()):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                number = float(value)  # an int past 1e308 overflows
            except OverflowError:
                continue
            if math.isfinite(number):
                out[str(key)[:100]] = number
    return out


def ended(kind: ScoreKind, error: str) -> Observation:
    """A finished episode at reward 0 that says why."""
    return Observation(done=True, score=Score.failed(kind, error))


def _bad_messages(messages: Any) -> str | None:
    if not isinstance(messages, list) or not messages:
        return "step() gave no messages and did not end the episode"
    total = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in OBSERVATION_ROLES or not isinstance(m.get("content"), str):
            return f"observation message {i} is not a {{'role': tool|user, 'content': str}} dict"
        total += len(m["content"])
    if total > MAX_OBSERVATION_CHARS:
        return f"observation of {total} characters exceeds {MAX_OBSERVATION_CHARS}"
    return None
