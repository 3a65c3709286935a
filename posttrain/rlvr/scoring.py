"""Scoring a step's rollouts: each answer by its prompt's environment, failures made safe.

Shared by the training loop and held-out evaluation, so both score exactly alike.
:func:`play_and_score` is the one place that tells the two kinds of environment apart:
single-turn prompts are generated in one batch and then scored; multi-turn prompts run as
episodes (``posttrain.rollout.episodes``) that their environment scores as they end.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from posttrain.environments.base import (
    Completion,
    Environment,
    GroupEnvironment,
    Sample,
    Score,
    ScoreKind,
    score_batch,
    score_groups_safely,
)
from posttrain.chat_template import reopens_reasoning
from posttrain.config import EpisodeConfig, GenerationConfig
from posttrain.environments.multiturn import is_multiturn
from posttrain.errors import ConfigError
from posttrain.metrics import PhaseTimer
from posttrain.rollout.episodes import EpisodeJob, EpisodeResult
from posttrain.rollout.types import Rollout


@dataclass
class Played:
    """A step's rollouts and rewards, whatever kind of environment each prompt came from."""

    groups: list[list[Rollout]]  # [prompt][sample], in the order prompts were drawn
    scores: list[Score]  # flat, prompt-major: group i = scores[i*n:(i+1)*n]
    metrics: dict[str, float]  # per multi-turn environment: env/<name>/turns_mean, tool calls, errors

    def then(self, more: Played) -> Played:
        """This step's rollouts followed by ``more`` (a refill round): positions continue, metrics
        present in both are averaged weighted by their groups."""
        for k, group in enumerate(more.groups, start=len(self.groups)):
            for r in group:
                r.prompt_index = k
        a, b = len(self.groups), len(more.groups)
        metrics = {**self.metrics, **more.metrics}
        for key in self.metrics.keys() & more.metrics.keys():
            metrics[key] = (self.metrics[key] * a + more.metrics[key] * b) / (a + b)
        return Played(self.groups + more.groups, self.scores + more.scores, metrics)


def play_and_score(envs: dict[str, Environment], drawn: Sequence[tuple[str, Sample]], engines: Any,
                   gen: GenerationConfig, n: int, episodes: EpisodeConfig, *, concurrency: int, timeout: float,
                   group_timeout: float, timer: PhaseTimer | None = None) -> Played:
    """``n`` rollouts per drawn prompt, scored. ``engines`` has ``generate(prompts, gen, n)`` and
    ``play(jobs, gen, n, limits)`` (a RolloutPool or the loop's Engines); ``timer`` records ``gen`` and
    ``score`` (episodes score as they play: their time is ``gen``)."""
    phase = timer if timer is not None else (lambda _: nullcontext())
    multi = {name for name in {name for name, _ in drawn} if is_multiturn(envs[name])}
    single = [i for i, (name, _) in enumerate(drawn) if name not in multi]
    groups: list[list[Rollout]] = [[] for _ in drawn]
    scores: list[list[Score]] = [[] for _ in drawn]
    results: dict[str, list[EpisodeResult]] = {}
    with phase("gen"):
        if single:
            for i, group in zip(single, engines.generate([drawn[i][1].messages for i in single], gen, n)):
                for r in group:
                    r.prompt_index = i  # its position in the step, not in the single-turn batch
                groups[i] = group
        if multi:
            jobs = [EpisodeJob(envs[name], [drawn[i][1] for i in rows], rows) for name, rows in _rows(drawn, multi).items()]
            _check_template(engines)
            for job, played in zip(jobs, engines.play(jobs, gen, n, episodes)):
                for i, episodes_of_i in zip(job.indices, played):
                    groups[i] = [e.rollout for e in episodes_of_i]
                    scores[i] = [e.score for e in episodes_of_i]
                    results.setdefault(drawn[i][0], []).extend(episodes_of_i)
    with phase("score"):
        if single:
            flat = score_rollouts(envs, [drawn[i] for i in single], [groups[i] for i in single], concurrency,
                                  timeout, group_timeout)
            for k, i in enumerate(single):
                scores[i] = [reject_reopened_reasoning(r, s) for r, s in zip(groups[i], flat[k * n : (k + 1) * n])]
    metrics = {k: v for name, played in results.items() for k, v in episode_metrics(envs[name].name, played).items()}
    return Played(groups, [s for group in scores for s in group], metrics)


def reject_reopened_reasoning(rollout: Rollout, score: Score) -> Score:
    """A thinking completion whose answer holds ``<think>`` or ``</think>`` again is malformed (reward 0,
    ``invalid``) whatever the verifier said: the reasoning ends at the first ``</think>``, and a policy
    rewarded for "answer </think> answer" learns to write it (seen in the main job's RLVR stage)."""
    if rollout.reasoning is None or not reopens_reasoning(rollout.answer):
        return score
    return Score.failed(ScoreKind.INVALID, "think tag in the answer (reasoning closed twice)", score.metrics)


def episode_metrics(name: str, results: Sequence[EpisodeResult]) -> dict[str, float]:
    """``env/<name>/turns_mean`` and the step's counts of tool calls, malformed calls, errors the
    environment reported and truncated episodes."""
    if not results:
        return {}
    return {f"env/{name}/turns_mean": sum(r.turns for r in results) / len(results),
            f"env/{name}/tool_calls": float(sum(r.tool_calls for r in results)),
            f"env/{name}/tool_call_errors": float(sum(r.tool_call_errors for r in results)),
            f"env/{name}/step_errors": float(sum(r.step_errors for r in results)),
            f"env/{name}/truncated": float(sum(r.truncated for r in results))}


def _rows(drawn: Sequence[tuple[str, Sample]], names: set[str]) -> dict[str, list[int]]:
    rows: dict[str, list[int]] = {}
    for i, (name, _) in enumerate(drawn):
        if name in names:
            rows.setdefault(name, []).append(i)
    return rows


def _check_template(engines: Any) -> None:
    model = getattr(engines, "model", None)
    if model is not None and getattr(model, "chat_template", "posttrain") != "posttrain":
        raise ConfigError("multi-turn environments need model.chat_template=posttrain (episodes append "
                          f"observations with its continuation); got {model.chat_template!r}")


def score_rollouts(envs: dict[str, Environment], drawn: Sequence[tuple[str, Sample]],
                   groups: Sequence[Sequence[Rollout]], concurrency: int, timeout: float,
                   group_timeout: float) -> list[Score]:
    """Each rollout's answer scored by its prompt's environment; flat, prompt-major order.

    ``timeout`` bounds one completion's scoring, ``group_timeout`` a group environment's (a GenRM)
    one call, which gets all of its groups of the step at once so its judge batches every
    comparison into one generation. Failures become reward 0 plus a named error (``score_safely``).
    """
    by_env: dict[str, list[int]] = {}
    for i, (name, _) in enumerate(drawn):
        by_env.setdefault(name, []).append(i)

    async def run() -> list[list[Score]]:
        out: list[list[Score]] = [[] for _ in drawn]

        async def one_env(name: str, rows: list[int]) -> None:
            env = envs[name]
            if isinstance(env, GroupEnvironment):
                done = await score_groups_safely(env, [drawn[i][1] for i in rows],
                                                 [[_completion(r) for r in groups[i]] for i in rows], group_timeout)
            else:
                done = await asyncio.gather(*(score_batch(env, [drawn[i][1]] * len(groups[i]),
                                                          [r.answer for r in groups[i]], concurrency, timeout)
                                              for i in rows))
            for i, scores in zip(rows, done):
                out[i] = list(scores)

        await asyncio.gather(*(one_env(name, rows) for name, rows in by_env.items()))
        return out

    return [s for group in asyncio.run(run()) for s in group]


def _completion(r: Rollout) -> Completion:
    return Completion(r.answer, r.reasoning, r.reasoning_tokens, max(0, len(r.token_ids) - r.reasoning_tokens))
