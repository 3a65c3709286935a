"""The solved-prompt filter: the recipe's pre-pass before RL.

A prompt the starting policy solves in every one of k samples teaches nothing -- every group
drawn from it has equal rewards, so its advantages are all zero -- yet it takes a slot in every
step that draws it. Before step 1 the stage samples k completions for (a seeded subset of) each
environment's training prompts, drops those solved every time, and hands the measured pass
rates to the curriculum as its starting point. The survivors are part of the sampler's state,
so a resumed run draws from the same pool.
"""

from __future__ import annotations

import logging
import random
from typing import Any

from posttrain.environments.base import Environment, GroupEnvironment, Sample
from posttrain.environments.mixing import MixedSampler, filter_solved, pass_rates_from_scores
from posttrain.rlvr.config import RLVRConfig
from posttrain.rlvr.scoring import play_and_score

log = logging.getLogger(__name__)


def drop_solved(cfg: RLVRConfig, sampler: MixedSampler, envs: dict[str, Environment], engines: Any) -> dict[str, float]:
    """Measure, filter and seed the curriculum; returns ``filter/<env>/...`` metrics."""
    f = cfg.run.solved_filter
    rng = random.Random(cfg.run.seed)
    drawn: list[tuple[str, Sample]] = []
    for name, env_sampler in sampler.samplers.items():
        if isinstance(envs[name], GroupEnvironment):  # rewards relative to the group: "solved" means nothing
            log.info("solved filter: %s scores groups against each other; all its prompts stay", name)
            continue
        pool = list(env_sampler.samples)
        drawn += [(name, s) for s in (pool if len(pool) <= f.max_prompts else rng.sample(pool, f.max_prompts))]
    if not drawn:
        return {}
    k = f.samples
    played = play_and_score(envs, drawn, engines, cfg.generation, k, cfg.episodes,
                            concurrency=cfg.run.score_concurrency, timeout=cfg.run.score_timeout_s,
                            group_timeout=cfg.timeouts.judge_s)
    metrics: dict[str, float] = {}
    for name, env_sampler in sampler.samplers.items():
        rows = [i for i, (env, _) in enumerate(drawn) if env == name]
        if not rows:
            continue
        ids = [drawn[i][1].id for i in rows for _ in range(k)]
        rates = pass_rates_from_scores(ids, [played.scores[i * k + j] for i in rows for j in range(k)])
        kept = filter_solved(env_sampler.samples, rates, max_pass_rate=f.max_pass_rate)
        dropped = len(env_sampler.samples) - len(kept)
        if kept:
            env_sampler.keep_only([s.id for s in kept])
        else:
            log.warning("solved filter: the starting policy solves all %d measured prompts of %s; keeping them "
                        "all (the environment is too easy for this policy)", len(rows), name)
            dropped = 0
        env_sampler.update(rates)  # the curriculum starts from measured pass rates, not its prior
        label = envs[name].name
        metrics.update({f"filter/{label}/measured": float(len(rows)), f"filter/{label}/dropped": float(dropped),
                        f"filter/{label}/pass_rate": sum(rates.values()) / len(rates),
                        f"filter/{label}/kept": float(len(env_sampler.samples))})
        log.info("solved filter: %s: %d prompts measured (%d samples each), %d always solved and dropped, %d left",
                 name, len(rows), k, dropped, len(env_sampler.samples))
    return metrics
