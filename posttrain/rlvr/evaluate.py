"""Held-out evaluation: greedy answers to each environment's test split (greedy episodes for multi-turn
environments), scored like training."""

from __future__ import annotations

from typing import Any

from posttrain.config import JUDGE_S, EpisodeConfig, GenerationConfig
from posttrain.environments.base import Environment, ScoreKind
from posttrain.rlvr.scoring import play_and_score


def evaluate(engines: Any, envs: dict[str, Environment], gen: GenerationConfig, n_prompts: int, seed: int,
             concurrency: int = 8, timeout: float = 60.0, group_timeout: float = JUDGE_S,
             episodes: EpisodeConfig = EpisodeConfig()) -> dict[str, float]:
    """``eval/<env>/accuracy`` (reward 1.0, kind ok) and ``eval/<env>/reward`` per environment, plus
    the mean of every score metric an environment names in its ``eval_metrics`` (over the samples
    that report it), e.g. ``eval/genrm_preference/pairwise_correct``.

    ``engines`` is anything with ``generate(prompts, gen, n)`` and, for multi-turn environments,
    ``play(jobs, gen, n, limits)`` (a RolloutPool or the loop's Engines); ``timeout`` and ``group_timeout``
    bound scoring and ``episodes`` the episodes as in training (:func:`play_and_score`); multi-turn
    environments also report ``eval/<env>/turns_mean`` and their tool-call counts.
    """
    greedy = gen.model_copy(update={"temperature": 0.0})
    out: dict[str, float] = {}
    for key, env in envs.items():
        samples = list(env.samples("test", seed))[:n_prompts]
        if not samples:
            continue
        played = play_and_score({key: env}, [(key, s) for s in samples], engines, greedy, 1, episodes,
                                concurrency=concurrency, timeout=timeout, group_timeout=group_timeout)
        scores, name = played.scores, env.name
        out.update({"eval/" + k[len("env/"):]: v for k, v in played.metrics.items()})
        out[f"eval/{name}/accuracy"] = sum(s.kind is ScoreKind.OK and s.reward >= 1.0 for s in scores) / len(scores)
        out[f"eval/{name}/reward"] = sum(s.reward for s in scores) / len(scores)
        out[f"eval/{name}/prompts"] = float(len(scores))
        for metric in env.eval_metrics:
            values = [s.metrics[metric] for s in scores if metric in s.metrics]
            if values:
                out[f"eval/{name}/{metric}"] = sum(values) / len(values)
    return out
