"""The RLVR controller: one synchronous loop that reads like the algorithm.

    prompts pool  <- drop the prompts the starting policy always solves (optional, once)
    for step:
        prompts   <- mixed sampler (fixed env ratios, optional curriculum)
        rollouts  <- rollout engines (vLLM actors rollout-0..), n per prompt        [gen]
                     (multi-turn environments: n episodes per prompt, token-exact,
                     tool/env tokens masked from the loss, scored by their env as they end)
        rewards   <- each environment scores its answers (code on sandbox-N actors;
                     a GenRM judges a whole group at once)                          [score]
        adv       <- group-relative advantages; masks for dead groups / overlong
        trainer   <- clipped policy-gradient update on trainer-0.. (one process group) [train]
                     (run.colocate: the engines sleep meanwhile, rlvr.colocate)
        engines   <- new weights, prefix cache reset, logprob check                 [sync]
        log, checkpoint every K steps

With ``run.max_staleness = k > 0`` the [gen] and [score] of the next k steps run on a producer
thread (``rlvr.async_rollouts``) while the trainer trains; each rollout carries the version of the
weights that sampled it, and the loss's truncated IS weight and mismatch mask correct the lag.

The actors live in one placement group per stage (``rlvr.actors.StageActors``). Everything
that can fail on hostile output (scoring) is turned into reward 0 plus a counted error by
``score_safely``; a dead rollout engine is restarted (generation retried, a sync redone,
training never repeated), a dead sandbox actor by Ray (its job re-sent).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from contextlib import closing, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.config import write_resolved
from posttrain.environments.base import Environment, Sample, Score, ScoreKind
from posttrain.environments.mixing import (
    CurriculumConfig,
    EnvSampler,
    MixedSampler,
    env_metrics,
    pass_rates_from_scores,
)
from posttrain.environments.registry import opened
from posttrain.errors import ConfigError
from posttrain.metrics import MetricsLogger, PhaseTimer
from posttrain.orchestration import cluster
from posttrain.rlvr.actors import Engines, StageActors, local_cpus
from posttrain.rlvr.advantages import group_advantages
from posttrain.rlvr.async_rollouts import RolloutProducer, staleness_metrics
from posttrain.rlvr.batch import build_batch
from posttrain.rlvr.colocate import trainer_turn
from posttrain.rlvr.config import RLVRConfig
from posttrain.rlvr.evaluate import evaluate_modes
from posttrain.rlvr.policy_loss import overlong_mask
from posttrain.rlvr.scoring import Played, play_and_score
from posttrain.rlvr.solved_filter import drop_solved
from posttrain.rlvr.trainer_group import TrainerGroup
from posttrain.rollout.types import Rollout
from posttrain.samples_log import SampleLog
from posttrain.training.checkpoint import latest_checkpoint

log = logging.getLogger(__name__)


def main(cfg: RLVRConfig, resume: bool = False, stage: str = "rlvr") -> dict[str, float]:
    """Run the stage; returns the last step's metrics. Re-run with ``resume`` after a crash.

    ``stage`` labels metrics and the placement group: RLHF and GenRM training run this same loop.
    """
    if not resume and latest_checkpoint(cfg.run_dir) is not None:
        raise ConfigError(f"run_dir {cfg.run_dir!r} already holds checkpoints: pass --resume to continue "
                          "that run, or choose another run_dir")
    log.info(_describe_algorithm(cfg))
    with opened(cfg.environments) as envs:  # closed when the stage ends, also on error
        write_resolved(cfg, cfg.run_dir)  # after the environments load: a bad option leaves no run folder
        return _run(cfg, envs, resume, stage)


def _run(cfg: RLVRConfig, envs: dict[str, Environment], resume: bool, stage: str) -> dict[str, float]:
    sampler = _make_sampler(cfg, envs)  # validates every dataset before any actor starts
    actors = StageActors(cfg, envs, stage)
    cluster.init_ray(metrics_export_port=cfg.run.metrics_port, num_cpus=local_cpus(actors.roles),
                     dashboard=cfg.run.dashboard, run_dir=cfg.run_dir)
    last: dict[str, float] = {}
    metrics_logger = MetricsLogger(cfg.run_dir, stage=stage, loggers=cfg.run.loggers, config=cfg.model_dump(mode="json"))
    with actors, closing(metrics_logger) as metrics_log:
        trainer, engines = actors.trainer, actors.engines
        assert trainer is not None and engines is not None
        start_step = _restore(cfg, trainer, engines, sampler, envs, resume)
        if cfg.run.eval_every and start_step == 0 and not starting_policy_measured(cfg.run_dir, envs):
            metrics_log.log(0, _evaluate(cfg, engines, envs))
        if cfg.run.solved_filter.enabled and start_step == 0:  # after the eval: it measures the starting policy too
            metrics_log.log(0, drop_solved(cfg, sampler, envs, engines))
        started = time.monotonic()
        samples = SampleLog(cfg.run_dir, cfg.run.log_samples, metrics_log.log_text)
        lock = threading.Lock()  # the sampler: drawn from by an asynchronous run's producer thread
        def produce(s: int) -> Collected:  # on the producer's thread: in-flight updates cut its generations
            with engines.segmented(cfg.run.segment_tokens):
                return collect(cfg, s, sampler, envs, engines, lock)

        producer = RolloutProducer(produce, cfg.run.max_staleness, start_step,
                                   cfg.run.steps) if cfg.run.max_staleness else None
        quiet = producer.paused if producer is not None else nullcontext  # evals and checkpoints: nothing in flight
        with closing(producer) if producer is not None else nullcontext():
            for step in range(start_step, cfg.run.steps):
                with lock:
                    sampler.set_progress(run_progress(cfg, step, time.monotonic() - started))
                if producer is None:
                    last = rl_step(cfg, step, sampler, envs, engines, trainer, samples)
                else:  # the oldest produced step; the producer plays the next ones meanwhile
                    last = learn(cfg, step, producer.take(step), sampler, envs, engines, trainer, samples, lock)
                    producer.finished(step)
                    last.update(producer.metrics())
                out_of_time = cfg.run.max_minutes is not None and time.monotonic() - started > 60 * cfg.run.max_minutes
                done = step + 1 == cfg.run.steps or out_of_time
                if cfg.run.eval_every and ((step + 1) % cfg.run.eval_every == 0 or done):
                    with quiet():
                        evaluated = time.monotonic()
                        last.update(_evaluate(cfg, engines, envs))
                        last["time/eval_s"] = time.monotonic() - evaluated
                metrics_log.log(step + 1, last)
                log.info(_one_line(step + 1, last))
                if (step + 1) % cfg.run.save_every == 0 or done:
                    with quiet(), lock:
                        _save(trainer, cfg, step + 1, sampler, envs)
                if out_of_time:
                    log.info("run.max_minutes=%g reached after step %d; stopping", cfg.run.max_minutes, step + 1)
                    break
        log.info("final model: %s", trainer.export(str(Path(cfg.run_dir) / "model")))
    return last


def _restore(cfg: RLVRConfig, trainer: TrainerGroup, engines: Engines, sampler: MixedSampler,
             envs: dict[str, Environment], resume: bool) -> int:
    """The step to start from: the last checkpoint's (trainer, sampler, environments, engines brought to it) or 0."""
    state = trainer.resume(cfg.run_dir) if resume else None
    if state is None:
        if resume:
            log.info("no checkpoint in %s yet: starting from step 0", cfg.run_dir)
        return 0
    sampler.load_state_dict(state["sampler"])
    for name, env_state in state.get("envs", {}).items():  # e.g. a GenRM's shuffle RNG and judge seed
        envs[name].load_state_dict(env_state)
    engines.sync()  # engines start from the base weights; bring them to the checkpoint
    log.info("resumed from step %d", int(state["step"]))
    return int(state["step"])


@dataclass
class Collected:
    """A step's played prompts, before learning: what the producer of an asynchronous run hands over."""

    drawn: list[tuple[str, Sample]]
    played: Played
    rounds: int
    timer: PhaseTimer


def rl_step(cfg: RLVRConfig, step: int, sampler: MixedSampler, envs: dict[str, Environment],
            engines: Engines, trainer: TrainerGroup, samples: SampleLog | None = None) -> dict[str, float]:
    return learn(cfg, step, collect(cfg, step, sampler, envs, engines), sampler, envs, engines, trainer, samples)


def collect(cfg: RLVRConfig, step: int, sampler: MixedSampler, envs: dict[str, Environment], engines: Engines,
            sampler_lock: Any = None) -> Collected:
    """Draw the step's prompts, roll them out and score them (refilled while too few groups differ)."""
    lock = sampler_lock or nullcontext()
    timer = PhaseTimer()
    n = cfg.rollout.samples_per_prompt
    with lock:
        drawn = sampler.next_batch(cfg.run.prompts_per_step)  # [(env name, sample)]
    # a fresh sampling seed per step (reproducible, so a resumed run draws the same rollouts)
    gen = cfg.generation.model_copy(update={"seed": cfg.generation.seed + 1_000_003 * (step + 1)})
    # single-turn prompts: generate [gen] then score [score]; multi-turn ones play episodes that
    # their environment scores as they end [gen]

    def play(prompts: Sequence[tuple[str, Sample]], round_: int) -> Played:
        sampling = gen if round_ == 0 else gen.model_copy(update={"seed": gen.seed + 7919 * round_})
        return play_and_score(envs, prompts, engines, sampling, n, cfg.episodes, concurrency=cfg.run.score_concurrency,
                              timeout=cfg.run.score_timeout_s, group_timeout=cfg.timeouts.judge_s, timer=timer)

    played = play(drawn, 0)
    rounds = 1
    while rounds <= cfg.run.refill_rounds and informative_groups(played.scores, n) < cfg.run.prompts_per_step:
        with lock:
            more = sampler.next_batch(cfg.run.prompts_per_step)  # DAPO's dynamic sampling, bounded by refill_rounds
        played, drawn = played.then(play(more, rounds)), [*drawn, *more]
        rounds += 1
    return Collected(drawn, played, rounds, timer)


def learn(cfg: RLVRConfig, step: int, collected: Collected, sampler: MixedSampler, envs: dict[str, Environment],
          engines: Engines, trainer: TrainerGroup, samples: SampleLog | None = None,
          sampler_lock: Any = None) -> dict[str, float]:
    """Advantages, masks, the update and the weight sync of one collected step; its metrics."""
    drawn, played, rounds, timer = collected.drawn, collected.played, collected.rounds, collected.timer
    n = cfg.rollout.samples_per_prompt
    rollouts = [r for group in played.groups for r in group]  # prompt-major: group i = rollouts[i*n:(i+1)*n]
    scores = played.scores
    if samples is not None:
        samples.log(step + 1, drawn, played.groups, scores)
    rewards = torch.tensor([s.reward for s in scores], dtype=torch.float32)
    adv = group_advantages(rewards, n, baseline=cfg.algorithm.baseline, scale=cfg.algorithm.scale,
                           drop_zero_variance=cfg.algorithm.drop_zero_variance)
    keep = adv.keep.clone()
    if cfg.algorithm.overlong_filter:
        keep &= overlong_mask([r.finish_reason for r in rollouts]).bool()
    keep &= torch.tensor([s.kind.trained for s in scores])  # infra failures say nothing about the completion
    keep &= torch.tensor([r.model_tokens > 0 for r in rollouts])  # an episode that failed before its first turn
    if rounds > 1:  # refilled: train at most prompts_per_step informative groups, the earliest drawn
        keep &= first_groups(keep, n, cfg.run.prompts_per_step)
    # Only rollouts that carry gradient go to the trainer: a dropped one would still cost a
    # forward and backward pass (most groups are all-0 or all-1 early and late in training).
    kept = [i for i in range(len(rollouts)) if keep[i]]
    # before the update the trainer's weights are the engines' (synced every step): the rollouts' lag
    lag = staleness_metrics(rollouts, engines.version, cfg.run.max_staleness) if cfg.run.max_staleness else {}
    with timer("train"):
        if kept:
            batch = build_batch([rollouts[i] for i in kept], adv.advantages[kept], torch.ones(len(kept)), pad_id=0)
            with trainer_turn(cfg.run.colocate, cfg.train.offload_optimizer, engines, trainer) as swap:
                train_metrics = trainer.train_step(batch, cfg.generation.temperature)
            train_metrics = {**train_metrics, **swap}
        else:
            log.warning("step %d trains nothing: %s", step + 1, _why_nothing_trains(rewards, n, adv.zero_variance_groups))
            train_metrics = {"tokens/trained": 0.0, "train/skipped_updates": 1.0}
    with timer("sync"):
        sync = engines.sync(rollouts[kept[0]]) if kept else None  # no update: the engines are current
    with sampler_lock or nullcontext():
        _update_curriculum(sampler, drawn, scores, n)
    metrics = {**train_metrics, **timer.seconds, **_step_metrics(envs, drawn, rollouts, scores, n, adv, keep),
               **played.metrics, **lag}
    if sync is not None:
        metrics["sync/max_abs_logprob_diff"] = sync.max_abs_logprob_diff
        metrics["sync/seconds"] = sync.seconds
    metrics["rollout/engine_restarts"] = float(engines.restarts)
    metrics["rollout/rounds"] = float(rounds)
    gen_tokens = sum(r.model_tokens for r in rollouts)
    metrics["rollout/gen_tokens"] = float(gen_tokens)
    metrics["throughput/gen_tokens_per_s"] = gen_tokens / max(timer.seconds["time/gen_s"], 1e-9)
    return metrics


def informative_groups(scores: Sequence[Score], n: int) -> int:
    """Groups whose rewards differ (the ones GRPO can learn from)."""
    rewards = [s.reward for s in scores]
    return sum(len(set(rewards[i:i + n])) > 1 for i in range(0, len(rewards), n))


def first_groups(keep: torch.Tensor, n: int, limit: int) -> torch.Tensor:
    """``keep`` limited to its first ``limit`` groups that keep any rollout (whole groups)."""
    groups = keep.view(-1, n).any(dim=1)
    chosen = groups & (groups.cumsum(0) <= limit)
    return chosen.repeat_interleave(n)


def run_progress(cfg: RLVRConfig, step: int, elapsed_s: float) -> float:
    """How far the run is, for the curriculum: the larger of the steps done and the share of
    ``run.max_minutes`` used (a run capped by time never reaches its ``run.steps``)."""
    done = step / cfg.run.steps
    if cfg.run.max_minutes:
        done = max(done, elapsed_s / (60 * cfg.run.max_minutes))
    return min(1.0, done)


def _why_nothing_trains(rewards: torch.Tensor, n: int, zero_variance_groups: int) -> str:
    groups = rewards.numel() // n
    if zero_variance_groups == groups:
        solved = int((rewards.view(groups, n)[:, 0] >= 1.0).sum())
        return (f"every group's rewards were equal ({solved} of {groups} groups all solved, the rest all at one "
                "lower reward), so no advantage is non-zero; harder/easier prompts (curriculum, the solved "
                "filter) or more samples per prompt give groups that differ")
    return "every rollout was masked (cut at max_new_tokens with the overlong filter on, or scoring infra errors)"


def _step_metrics(envs: dict[str, Environment], drawn: Sequence[tuple[str, Sample]], rollouts: list[Rollout],
                  scores: list[Score], n: int, adv: Any, keep: torch.Tensor) -> dict[str, float]:
    out: dict[str, float] = {}
    for name in envs:
        env_scores = [scores[i * n + j] for i, (env, _) in enumerate(drawn) if env == name for j in range(n)]
        out.update(env_metrics(envs[name].name, env_scores))
    out["reward/mean"] = sum(s.reward for s in scores) / len(scores)
    out["rollout/zero_variance_groups"] = float(adv.zero_variance_groups)
    out["rollout/kept_fraction"] = float(keep.float().mean())
    out["rollout/completion_tokens_mean"] = sum(r.model_tokens for r in rollouts) / len(rollouts)
    out["rollout/reasoning_tokens_mean"] = sum(r.reasoning_tokens for r in rollouts) / len(rollouts)
    out["rollout/truncated_fraction"] = sum(r.finish_reason == "length" for r in rollouts) / len(rollouts)
    out["verifier/errors"] = float(sum(s.kind is not ScoreKind.OK for s in scores))
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


def starting_policy_measured(run_dir: str, envs: dict[str, Environment]) -> bool:
    """Whether step 0 already holds the held-out eval of every environment: a run resumed before its first
    checkpoint, or the pipeline carried the previous stage's final eval over (same model, same eval)."""
    from posttrain.report_data import logged_at

    measured = all(logged_at(run_dir, 0, f"eval/{name}/") for name in envs)
    if measured:
        log.info("eval at step 0: already in %s/metrics.jsonl, not repeated", run_dir)
    return measured


def _evaluate(cfg: RLVRConfig, engines: Engines, envs: dict[str, Environment]) -> dict[str, float]:
    result = evaluate_modes(engines, envs, cfg.generation, cfg.run.eval_prompts, cfg.run.seed,
                            cfg.run.eval_without_thinking, concurrency=cfg.run.score_concurrency,
                            timeout=cfg.run.score_timeout_s, group_timeout=cfg.timeouts.judge_s, episodes=cfg.episodes)
    log.info("eval: %s", " ".join(f"{k}={v:.3f}" for k, v in result.items() if not k.endswith("/prompts")))
    return result


def _save(trainer: TrainerGroup, cfg: RLVRConfig, step: int, sampler: MixedSampler,
          envs: dict[str, Environment]) -> None:
    env_states = {name: env.state_dict() for name, env in envs.items()}
    path = trainer.save(cfg.run_dir, step, {"sampler": sampler.state_dict(), "envs": env_states}, cfg.run.keep_last)
    log.info("checkpoint %s", path)


def _describe_algorithm(cfg: RLVRConfig) -> str:
    """The algorithm as trained, derived values included (Dr.GRPO's divisor comes from the generation length)."""
    a, loss = cfg.algorithm, cfg.loss_config()
    line = (f"algorithm {a.variant}: baseline={a.baseline} scale={a.scale} aggregation={loss.aggregation} "
            f"clip=[{1 - loss.eps_low:g}, {1 + loss.eps_high:g}]")
    if loss.aggregation == "seq_mean_token_sum_norm":
        origin = "algorithm.sum_norm" if a.sum_norm else "generation.max_new_tokens"
        line += f" sum_norm={loss.sum_norm} ({origin})"
    return line


def _one_line(step: int, m: dict[str, float]) -> str:
    times = " ".join(f"{k[5:-2]}={v:.1f}s" for k, v in m.items() if k.startswith("time/"))
    return (f"step {step}: reward={m.get('reward/mean', 0):.3f} kept={m.get('rollout/kept_fraction', 0):.2f} "
            f"tokens={m.get('rollout/completion_tokens_mean', 0):.0f} mismatch={m.get('mismatch/logprob_abs_max', 0):.3g} "
            f"{times}")

