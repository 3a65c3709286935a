"""Held-out evaluation: greedy answers to each environment's test split, scored like training."""

from __future__ import annotations

from typing import Any

from posttrain.config import JUDGE_S, GenerationConfig
from posttrain.environments.base import Environment, ScoreKind
from posttrain.rlvr.scoring import score_rollouts


def evaluate(engines: Any, envs: dict[str, Environment], gen: GenerationConfig, n_prompts: int, seed: int,
             concurrency: int = 8, timeout: float = 60.0, group_timeout: float = JUDGE_S) -> dict[str, float]:
    """``eval/<env>/accuracy`` (reward 1.0, kind ok) and ``eval/<env>/reward`` per environment, plus
    the mean of every score metric an environment names in its ``eval_metrics`` (over the samples
    that report it), e.g. ``eval/genrm_preference/pairwise_correct``.

    ``engines`` is anything with ``generate(prompts, gen, n)`` (a RolloutPool or the loop's Engines);
    ``timeout`` and ``group_timeout`` bound scoring as in training (:func:`score_rollouts`).
    """
    greedy = gen.model_copy(update={"temperature": 0.0})
    out: dict[str, float] = {}
    for key, env in envs.items():
        samples = list(env.samples("test", seed))[:n_prompts]
        if not samples:
            continue
        groups = engines.generate([s.messages for s in samples], greedy, 1)
        scores = score_rollouts({key: env}, [(key, s) for s in samples], groups, concurrency, timeout,
                                group_timeout)
        name = env.name
        out[f"eval/{name}/accuracy"] = sum(s.kind is ScoreKind.OK and s.reward >= 1.0 for s in scores) / len(scores)
        out[f"eval/{name}/reward"] = sum(s.reward for s in scores) / len(scores)
        out[f"eval/{name}/prompts"] = float(len(scores))
        for metric in env.eval_metrics:
            values = [s.metrics[metric] for s in scores if metric in s.metrics]
            if values:
                out[f"eval/{name}/{metric}"] = sum(values) / len(values)
    return out
