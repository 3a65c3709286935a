"""The RLVR controller: one synchronous loop that reads like the algorithm.

    for step:
        prompts   <- mixed sampler (fixed env ratios, optional curriculum)
        rollouts  <- rollout engines (vLLM actors rollout-0..), n per prompt        [gen]
        rewards   <- each environment scores its answers (sandboxed verifiers)      [score]
        adv       <- group-relative advantages; masks for dead groups / overlong
        trainer-0 <- clipped policy-gradient update                                 [train]
        engines   <- new weights, prefix cache reset, logprob check                 [sync]
        log, checkpoint every K steps

Everything that can fail on hostile output (scoring) is already turned into reward 0 plus a
counted error by ``score_safely``; a dead rollout engine is restarted (generation retried, a
sync redone, training never repeated).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import Any

import torch

from posttrain.config import ModelConfig, write_resolved
from posttrain.environments.base import Environment, Sample, Score, score_batch
from posttrain.environments.mixing import (CurriculumConfig, EnvSampler, MixedSampler, env_metrics,
                                           pass_rates_from_scores)
from posttrain.environments.registry import load_environment
from posttrain.metrics import MetricsLogger, PhaseTimer
from posttrain.orchestration import cluster
from posttrain.rlvr.advantages import group_advantages
from posttrain.rlvr.batch import build_batch
from posttrain.rlvr.config import RLVRConfig
from posttrain.rlvr.policy_loss import overlong_mask
from posttrain.rollout.pool import LogprobCheck, RolloutPool
from posttrain.rollout.types import EngineCrashedError, Rollout
from posttrain.training.checkpoint import latest_checkpoint

log = logging.getLogger(__name__)


def main(cfg: RLVRConfig, resume: bool = False) -> dict[str, float]:
    """Run the stage; returns the last step's metrics. Re-run with ``resume`` after a crash."""
    if not resume and latest_checkpoint(cfg.run_dir) is not None:
        raise FileExistsError(f"run_dir {cfg.run_dir!r} already holds checkpoints: pass --resume to continue "
                              "that run, or choose another run_dir")
    write_resolved(cfg, cfg.run_dir)
    envs = {e.name: load_environment(e) for e in cfg.environments}
    sampler = _make_sampler(cfg, envs)  # validates every dataset before any actor starts
    cluster.init_ray(metrics_export_port=cfg.run.metrics_port)
    if cfg.run.metrics_port:
        log.info("metrics: curl http://127.0.0.1:%d/metrics | grep ray_posttrain_", cfg.run.metrics_port)
    trainer = cluster.start_actor(_trainer_class(), "trainer-0", cfg.model, cfg.train, cfg.lora, cfg.algorithm,
                                  cfg.run.seed, cfg.init_from, num_cpus=1)
    engines: Engines | None = None
    metrics_log = MetricsLogger(cfg.run_dir, stage="rlvr")
    last: dict[str, float] = {}
    try:
        state = cluster.gather([trainer.resume.remote(cfg.run_dir)], ["trainer-0"], 600, "resume")[0] if resume else None
        start_step = 0
        if state is not None:
            sampler.load_state_dict(state["sampler"])
            start_step = int(state["step"])
            log.info("resumed from step %d", start_step)
        elif resume:
            log.info("no checkpoint in %s yet: starting from step 0", cfg.run_dir)
        engine_model = ModelConfig(**{**cfg.model.model_dump(), "name": cfg.init_from or cfg.model.name})
        engines = Engines(engine_model, cfg, trainer)
        if state is not None:
            engines.sync()  # engines start from the base weights; bring them to the checkpoint
        if cfg.run.eval_every and start_step == 0:
            metrics_log.log(0, _evaluate(cfg, engines, envs))
        started = time.monotonic()
        for step in range(start_step, cfg.run.steps):
            last = rl_step(cfg, step, sampler, envs, engines, trainer)
            out_of_time = cfg.run.max_minutes is not None and time.monotonic() - started > 60 * cfg.run.max_minutes
            done = step + 1 == cfg.run.steps or out_of_time
            if cfg.run.eval_every and ((step + 1) % cfg.run.eval_every == 0 or done):
                last.update(_evaluate(cfg, engines, envs))
            metrics_log.log(step + 1, last)
            log.info(_one_line(step + 1, last))
            if (step + 1) % cfg.run.save_every == 0 or done:
                _save(trainer, cfg, step + 1, sampler)
            if out_of_time:
                log.info("run.max_minutes=%g reached after step %d; stopping", cfg.run.max_minutes, step + 1)
                break
    finally:
        metrics_log.close()
        if engines is not None:
            engines.shutdown()
        cluster.kill_actor(trainer)
        for env in envs.values():
            getattr(env, "close", lambda: None)()
    return last


class Engines:
    """The rollout pool, restarted when an engine dies: generation is retried, a sync redone.

    Training is never repeated: a crash after the update only costs a restart and a sync of
    the weights the trainer already has.
    """

    def __init__(self, model: ModelConfig, cfg: RLVRConfig, trainer: Any) -> None:
        self.model, self.cfg, self.trainer = model, cfg, trainer
        self.pool = RolloutPool(model, cfg.rollout)
        self.restarts = 0

    def generate(self, prompts: list[Any], gen: Any, n: int) -> list[list[Rollout]]:
        return self._retry(lambda: self.pool.generate(prompts, gen, n), "generate")

    def sync(self, probe: Rollout | None = None) -> Any:
        return self._retry(lambda: _sync(self.pool, self.trainer, self.cfg.rollout.sync_dir, probe), "sync")

    def _retry(self, call: Any, what: str) -> Any:
        for attempt in range(self.cfg.run.max_step_retries + 1):
            try:
                return call()
            except EngineCrashedError as exc:
                if attempt == self.cfg.run.max_step_retries:
                    raise
                log.warning("%s: %s; restarting the rollout engines", what, exc)
                self.restart()
        raise AssertionError("unreachable")

    def restart(self) -> None:
        self.pool.shutdown()
        self.pool = RolloutPool(self.model, self.cfg.rollout)
        self.restarts += 1
        # fresh engines hold the base weights: give them the trainer's
        _sync(self.pool, self.trainer, self.cfg.rollout.sync_dir)

    def shutdown(self) -> None:
        self.pool.shutdown()


def rl_step(cfg: RLVRConfig, step: int, sampler: MixedSampler, envs: dict[str, Environment],
            engines: Engines, trainer: Any) -> dict[str, float]:
    timer = PhaseTimer()
    n = cfg.rollout.samples_per_prompt
    drawn = sampler.next_batch(cfg.run.prompts_per_step)  # [(env name, sample)]
    # a fresh sampling seed per step (reproducible, so a resumed run draws the same rollouts)
    gen = cfg.generation.model_copy(update={"seed": cfg.generation.seed + 1_000_003 * (step + 1)})
    with timer("gen"):
        groups = engines.generate([s.messages for _, s in drawn], gen, n)
    rollouts = [r for group in groups for r in group]  # prompt-major: group i = rollouts[i*n:(i+1)*n]
    with timer("score"):
        scores = score_rollouts(envs, drawn, groups, cfg.run.score_concurrency, cfg.run.score_timeout_s)
    rewards = torch.tensor([s.reward for s in scores], dtype=torch.float32)
    adv = group_advantages(rewards, n, baseline=cfg.algorithm.baseline, scale=cfg.algorithm.scale,
                           drop_zero_variance=cfg.algorithm.drop_zero_variance)
    keep = adv.keep.clone()
    if cfg.algorithm.overlong_filter:
        keep &= overlong_mask([r.finish_reason for r in rollouts]).bool()
    keep &= torch.tensor([not (s.error or "").startswith("infra") for s in scores])  # not scored: not trained
    # Only rollouts that carry gradient go to the trainer: a dropped one would still cost a
    # forward and backward pass (most groups are all-0 or all-1 early and late in training).
    kept = [i for i in range(len(rollouts)) if keep[i]]
    with timer("train"):
        if kept:
            batch = build_batch([rollouts[i] for i in kept], adv.advantages[kept], torch.ones(len(kept)), pad_id=0)
            train_metrics = cluster.gather([trainer.train_step.remote(batch, cfg.generation.temperature)],
                                           ["trainer-0"], cfg.rollout.call_timeout_s, "train step")[0]
        else:
            train_metrics = {"tokens/trained": 0.0, "train/skipped_updates": 1.0}
    with timer("sync"):
        sync = engines.sync(rollouts[kept[0]]) if kept else None  # no update: the engines are current
    _update_curriculum(sampler, drawn, scores, n)
    metrics = {**train_metrics, **timer.seconds, **_step_metrics(envs, drawn, rollouts, scores, n, adv, keep)}
    if sync is not None:
        metrics["sync/max_abs_logprob_diff"] = sync.max_abs_logprob_diff
        metrics["sync/seconds"] = sync.seconds
    metrics["rollout/engine_restarts"] = float(engines.restarts)
    gen_tokens = sum(len(r.token_ids) for r in rollouts)
    metrics["throughput/gen_tokens_per_s"] = gen_tokens / max(timer.seconds["time/gen_s"], 1e-9)
    return metrics


def score_rollouts(envs: dict[str, Environment], drawn: Sequence[tuple[str, Sample]],
                   groups: Sequence[Sequence[Rollout]], concurrency: int, timeout: float) -> list[Score]:
    """Each rollout's answer scored by its prompt's environment; flat, prompt-major order."""

    async def run() -> list[list[Score]]:
        jobs = [score_batch(envs[name], [sample] * len(group), [r.answer for r in group], concurrency, timeout)
                for (name, sample), group in zip(drawn, groups)]
        return list(await asyncio.gather(*jobs))

    return [s for group in asyncio.run(run()) for s in group]


def _step_metrics(envs: dict[str, Environment], drawn: Sequence[tuple[str, Sample]], rollouts: list[Rollout],
                  scores: list[Score], n: int, adv: Any, keep: torch.Tensor) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in envs:
        env_scores = [scores[i * n + j] for i, (env, _) in enumerate(drawn) if env == name for j in range(n)]
        out.update(env_metrics(getattr(envs[name], "name", name), env_scores))
    out["reward/mean"] = sum(s.reward for s in scores) / len(scores)
    out["rollout/zero_variance_groups"] = float(adv.zero_variance_groups)
    out["rollout/kept_fraction"] = float(keep.float().mean())
    out["rollout/completion_tokens_mean"] = sum(len(r.token_ids) for r in rollouts) / len(rollouts)
    out["rollout/reasoning_tokens_mean"] = sum(r.reasoning_tokens for r in rollouts) / len(rollouts)
    out["rollout/truncated_fraction"] = sum(r.finish_reason == "length" for r in rollouts) / len(rollouts)
    out["verifier/errors"] = float(sum(s.error is not None for s in scores))
    return out


def _update_curriculum(sampler: MixedSampler, drawn: Sequence[tuple[str, Sample]], scores: list[Score], n: int) -> None:
    by_env: dict[str, tuple[list[str], list[Score]]] = {}
    for i, (name, sample) in enumerate(drawn):
        ids, env_scores = by_env.setdefault(name, ([], []))
        ids.extend([sample.id] * n)
        env_scores.extend(scores[i * n : (i + 1) * n])
    for name, (ids, env_scores) in by_env.items():
        sampler.update(name, pass_rates_from_scores(ids, env_scores))


def _make_sampler(cfg: RLVRConfig, envs: dict[str, Environment]) -> MixedSampler:
    curriculum = CurriculumConfig(enabled=cfg.run.curriculum, steps=cfg.run.steps)
    samplers = {name: EnvSampler(env.samples("train", cfg.run.seed), curriculum, seed=cfg.run.seed + i)
                for i, (name, env) in enumerate(envs.items())}
    return MixedSampler(samplers, {e.name: e.weight for e in cfg.environments}, seed=cfg.run.seed)


def _sync(pool: RolloutPool, trainer: Any, sync_dir: str, probe: Rollout | None = None) -> Any:
    """New trainer weights into every engine, then (with a probe) the logprob agreement check."""
    update = cluster.gather([trainer.publish_weights.remote(sync_dir)], ["trainer-0"], 600, "publish weights")[0]
    check = None
    if probe is not None:
        ids = list(probe.prompt_ids) + list(probe.token_ids)
        logprobs = cluster.gather([trainer.reference_logprobs.remote(ids, len(probe.prompt_ids))],
                                  ["trainer-0"], 600, "logprob check")[0]
        check = LogprobCheck(ids, len(probe.prompt_ids), logprobs)
    return pool.push(update, check)


def _evaluate(cfg: RLVRConfig, engines: Engines, envs: dict[str, Environment]) -> dict[str, float]:
    from posttrain.rlvr.evaluate import evaluate

    result = evaluate(engines, envs, cfg.generation, cfg.run.eval_prompts, cfg.run.seed,
                      cfg.run.score_concurrency, cfg.run.score_timeout_s)
    log.info("eval: %s", " ".join(f"{k}={v:.3f}" for k, v in result.items() if not k.endswith("/prompts")))
    return result


def _save(trainer: Any, cfg: RLVRConfig, step: int, sampler: MixedSampler) -> None:
    ref = trainer.save.remote(cfg.run_dir, step, {"sampler": sampler.state_dict()}, cfg.run.keep_last)
    path = cluster.gather([ref], ["trainer-0"], 1800, "checkpoint")[0]
    log.info("checkpoint %s", path)


def _trainer_class() -> type:
    from posttrain.rlvr.trainer import PolicyTrainer

    return PolicyTrainer


def _one_line(step: int, m: dict[str, float]) -> str:
    times = " ".join(f"{k[5:-2]}={v:.1f}s" for k, v in m.items() if k.startswith("time/"))
    return (f"step {step}: reward={m.get('reward/mean', 0):.3f} kept={m.get('rollout/kept_fraction', 0):.2f} "
            f"tokens={m.get('rollout/completion_tokens_mean', 0):.0f} mismatch={m.get('mismatch/logprob_abs_max', 0):.3g} "
            f"{times}")

