"""Scoring a step's rollouts: each answer by its prompt's environment, failures made safe.

Shared by the training loop and held-out evaluation, so both score exactly alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from posttrain.environments.base import (
    Completion,
    Environment,
    GroupEnvironment,
    Sample,
    Score,
    score_batch,
    score_groups_safely,
)
from posttrain.rollout.types import Rollout


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
