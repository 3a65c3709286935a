"""Held-out evaluation: greedy answers to each environment's test split (greedy episodes for multi-turn
environments), scored like training."""

from __future__ import annotations

from typing import Any

from posttrain.chat_template import reopens_reasoning
from posttrain.config import JUDGE_S, EpisodeConfig, GenerationConfig
from posttrain.environments.base import Environment, Score, ScoreKind
from posttrain.rlvr.scoring import play_and_score
from posttrain.rollout.types import Rollout


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
        rollouts = [r for group in played.groups for r in group]
        out.update({"eval/" + k[len("env/"):]: v for k, v in played.metrics.items()})
        out[f"eval/{name}/accuracy"] = sum(map(solved, scores)) / len(scores)
        out[f"eval/{name}/reward"] = sum(s.reward for s in scores) / len(scores)
        out[f"eval/{name}/prompts"] = float(len(scores))
        if gen.enable_thinking:  # how long it reasons, how often it closes its reasoning, and by itself
            n = max(1, len(rollouts))
            out[f"eval/{name}/reasoning_tokens"] = sum(r.reasoning_tokens for r in rollouts) / n
            out[f"eval/{name}/reasoning_closed"] = sum(r.reasoning_closed for r in rollouts) / n
            out[f"eval/{name}/well_formed"] = sum(well_formed(r, gen.reasoning_budget) for r in rollouts) / n
        for metric in env.eval_metrics:
            values = [s.metrics[metric] for s in scores if metric in s.metrics]
            if values:
                out[f"eval/{name}/{metric}"] = sum(values) / len(values)
    return out


def solved(score: Score) -> bool:
    """A completion counted correct by the held-out metrics: judged (kind ok) with full reward."""
    return score.kind is ScoreKind.OK and score.reward >= 1.0


def well_formed(rollout: Rollout, budget: int | None) -> bool:
    """The reasoning format SFT teaches: the model closed ``<think>`` itself, before any budget cut, then
    answered (no think tag in the answer). A cut at the budget closes the reasoning but is not the model's."""
    within = budget is None or rollout.reasoning_tokens < budget
    answered = bool(rollout.answer.strip()) and not reopens_reasoning(rollout.answer)
    return rollout.reasoning_closed and within and answered


def evaluate_modes(engines: Any, envs: dict[str, Environment], gen: GenerationConfig, n_prompts: int, seed: int,
                   also_without_thinking: bool, **kwargs: Any) -> dict[str, float]:
    """:func:`evaluate` as trained (thinking and budget from ``gen``) and, when ``also_without_thinking``
    and ``gen`` thinks, again with thinking off, reported as ``eval/<env>/no_think/<metric>``: the
    reasoning-budget recipe promises both modes, so both are measured."""
    out = evaluate(engines, envs, gen, n_prompts, seed, **kwargs)
    if also_without_thinking and gen.enable_thinking:
        off = evaluate(engines, envs, gen.model_copy(update={"enable_thinking": False, "reasoning_budget": None}),
                       n_prompts, seed, **kwargs)
        out.update({f"{k.rsplit('/', 1)[0]}/no_think/{k.rsplit('/', 1)[1]}": v for k, v in off.items()})
    return out
