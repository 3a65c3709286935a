"""The actors of one RL stage, started together and torn down together.

``StageActors`` reserves a placement group with a bundle per actor (trainer workers, rollout
engines, sandbox actors, and whatever an environment brings, e.g. a GenRM's ``genrm-N``
engines), starts them in it, starts the environments with the stage's resources (the placement
group, and the sandbox actors as their code runner), and on exit stops them all and frees the
reservation -- also when start-up fails half-way. :class:`Engines` restarts dead rollout engines.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from posttrain.config import EpisodeConfig, ModelConfig
from posttrain.models import resolved_dtype
from posttrain.environments.base import Environment, StageResources
from posttrain.orchestration.placement import StagePlacement, bundle, total
from posttrain.rlvr.config import RLVRConfig
from posttrain.rlvr.trainer_group import TrainerGroup
from posttrain.rollout.episodes import EpisodeJob, EpisodeResult
from posttrain.rollout.pool import LogprobCheck, RolloutPool
from posttrain.rollout.types import EngineCrashedError, Rollout

log = logging.getLogger(__name__)
_CONTINUED_SEEDS = 10**6  # seed indices of continued completions: round * this + position in the step


class StageActors:
    """``with StageActors(cfg, envs, stage) as actors:`` -> ``actors.trainer``, ``.engines``, ``.sandbox``."""

    def __init__(self, cfg: RLVRConfig, envs: dict[str, Environment], stage: str) -> None:
        self.cfg, self.envs, self.stage = cfg, envs, stage
        self.roles = stage_roles(cfg, envs)
        self.placement: StagePlacement | None = None
        self.trainer: TrainerGroup | None = None
        self.engines: Engines | None = None
        self.sandbox: Any = None

    def __enter__(self) -> StageActors:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        cfg = self.cfg
        self.placement = StagePlacement(self.stage, self.roles, strategy=cfg.run.placement_strategy)
        self.trainer = TrainerGroup(cfg, placement=self.placement)
        if "sandbox" in self.roles:
            self.sandbox = _sandbox_pool(cfg, self.placement)
        resources = StageResources(placement=self.placement, code_runner=self.sandbox)
        for env in self.envs.values():  # a GenRM starts its engines; code is scored on the sandbox actors
            env.start(resources)
        self.engines = Engines(cfg.start_model(), cfg, self.trainer, self.placement)

    def close(self) -> None:
        for part in (self.engines, self.trainer, self.sandbox):
            if part is not None:
                part.shutdown()
        for env in self.envs.values():  # what they started lives in the placement group: stop it first
            env.close()
        if self.placement is not None:
            self.placement.remove()
        self.engines = self.trainer = self.sandbox = self.placement = None


def stage_roles(cfg: RLVRConfig, envs: dict[str, Environment]) -> dict[str, list[dict[str, float]]]:
    """The Ray resources each role of the stage reserves: one bundle per actor."""
    engine = bundle(cfg.rollout.cpus_per_engine, cfg.rollout.gpus_per_engine)
    roles = {"trainer": [bundle(cfg.train.num_cpus, cfg.train.num_gpus)] * cfg.train.workers,
             "rollout": [engine] * cfg.rollout.num_engines}
    if any(env.sandboxed for env in envs.values()):
        roles["sandbox"] = [bundle(cfg.sandbox.num_cpus)] * cfg.sandbox.workers
    for env in envs.values():  # e.g. a GenRM's judge engines (genrm-0..)
        for role, bundles in env.roles().items():
            roles[role] = roles.get(role, []) + list(bundles)
    return roles


def placement_lines(cfg: RLVRConfig, envs: dict[str, Environment] | None = None) -> list[str]:
    """What the stage asks Ray for, per role and in total (``--dry-run``): its placement group.
    ``envs``: the stage's environments, when already open (else they are opened here)."""
    if envs is None:
        from posttrain.environments.registry import opened

        with opened(cfg.environments) as opened_envs:
            return placement_lines(cfg, opened_envs)
    roles = stage_roles(cfg, envs)
    parts = []
    for role, bundles in roles.items():
        if bundles:
            shown = {k: v for k, v in bundles[0].items() if v}
            parts.append(f"{role} {len(bundles)} x {{{', '.join(f'{k} {v:g}' for k, v in shown.items())}}}")
    return [f"placement ({cfg.run.placement_strategy}): {'; '.join(parts)}",
            "placement total: " + ", ".join(f"{k} {v:g}" for k, v in total(roles).items() if v)]


def local_cpus(roles: dict[str, list[dict[str, float]]]) -> int:
    """Logical CPUs of a local cluster: the machine's, or what the stage reserves if that is more.

    The loop is synchronous -- the trainer idles while engines generate and the other way round --
    so on a laptop the roles take turns on the same cores instead of waiting for free ones.
    """
    need = sum(b.get("CPU", 0.0) for bundles in roles.values() for b in bundles)
    return max(os.cpu_count() or 1, math.ceil(need))


def _sandbox_pool(cfg: RLVRConfig, placement: StagePlacement) -> Any:
    from posttrain.verifiers.pool import VerifierPool
    from posttrain.verifiers.sandbox import Limits

    return VerifierPool(cfg.sandbox.workers, Limits(wall_s=cfg.sandbox.wall_s), call_timeout_s=cfg.sandbox.call_timeout_s,
                        num_cpus_per_worker=cfg.sandbox.num_cpus, placement=placement)


class Engines:
    """The rollout pool, restarted when an engine dies: generation is retried, a sync redone.

    Training is never repeated: a crash after the update only costs a restart and a sync of
    the weights the trainer already has. Every rollout carries the ``policy_version`` of the
    weights that sampled it. Calls hold a lock, so the producer thread of an asynchronous run
    (``rlvr.async_rollouts``) and the controller never use the pool at once: a weight sync lands
    between two generation calls -- and, with ``run.segment_tokens``, between two segments of one
    (the cut completions continue under the new weights; ``Rollout.version_changes`` says where).
    """

    def __init__(self, model: ModelConfig, cfg: RLVRConfig, trainer: TrainerGroup,
                 placement: StagePlacement | None = None) -> None:
        self.model, self.cfg, self.trainer, self.placement = model, cfg, trainer, placement
        # colocated engines sleep while the trainer trains (vLLM sleep mode)
        self.rollout = cfg.rollout.model_copy(update={"enable_sleep_mode": True}) if cfg.run.colocate else cfg.rollout
        self.pool = RolloutPool(model, self.rollout, placement=placement)
        try:
            self._connect()
        except BaseException:
            self.pool.shutdown()
            raise
        self.restarts = 0
        self._lock = threading.RLock()
        self._turn = threading.Condition()
        self._syncs_waiting = 0  # a waiting sync goes before the next generation call
        self._local = threading.local()  # the producer thread's segment_tokens (see segmented)

    @property
    def version(self) -> int:
        """The trainer's update count in the engines' weights."""
        return self.pool.policy_version

    def generate(self, prompts: list[Any], gen: Any, n: int) -> list[list[Rollout]]:
        segment = getattr(self._local, "segment_tokens", 0)
        first = gen.model_copy(update={"max_new_tokens": segment}) if 0 < segment < gen.max_new_tokens else gen
        self._after_syncs()
        groups = self._retry(lambda: _tagged(self.pool.generate(prompts, first, n), self.pool.policy_version), "generate")
        if first is not gen:
            flat = self._continued([r for group in groups for r in group], gen, segment)
            groups = [flat[i : i + n] for i in range(0, len(flat), n)]
        return groups

    @contextmanager
    def segmented(self, tokens: int) -> Iterator[None]:
        """Inside (on this thread), generation calls stop every ``tokens`` new tokens so that a waiting
        weight sync lands between them (``run.segment_tokens``: in-flight updates); 0 = whole completions."""
        self._local.segment_tokens = tokens
        try:
            yield
        finally:
            self._local.segment_tokens = 0

    def _continued(self, rollouts: list[Rollout], gen: Any, segment: int) -> list[Rollout]:
        """Continue the completions a segment cut, one segment at a time, until each has stopped or
        reached ``gen.max_new_tokens``; a sync waiting between two segments goes first."""
        for round_ in itertools.count(1):
            cut = [k for k, r in enumerate(rollouts) if r.finish_reason == "length" and len(r.token_ids) < gen.max_new_tokens]
            if not cut:
                return rollouts
            partials = [rollouts[k] for k in cut]
            budgets = [min(segment, gen.max_new_tokens - len(r.token_ids)) for r in partials]
            seeds = [_CONTINUED_SEEDS * round_ + k for k in cut]  # distinct from the first segment's and each other's

            def extend() -> tuple[int, list[Rollout]]:
                return self.pool.policy_version, self.pool.extend(partials, gen, budgets, seeds)

            self._after_syncs()
            version, done = self._retry(extend, "generate")
            for k, old, new in zip(cut, partials, done):
                last = old.version_changes[-1][1] if old.version_changes else old.policy_version
                if version != last:
                    new.version_changes.append((len(old.token_ids), version))
                rollouts[k] = new
        raise AssertionError("unreachable")

    def play(self, jobs: list[EpisodeJob], gen: Any, n: int, limits: EpisodeConfig) -> list[list[list[EpisodeResult]]]:
        """Multi-turn episodes (see ``RolloutPool.play``); after an engine died, all are replayed from
        their start on fresh engines (an episode's tokens would otherwise mix two engines' samples)."""
        def play() -> list[list[list[EpisodeResult]]]:
            played = self.pool.play(jobs, gen, n, limits)
            _tagged([[e.rollout for e in episodes] for job in played for episodes in job], self.pool.policy_version)
            return played

        self._after_syncs()
        return self._retry(play, "episodes")

    def sync(self, probe: Rollout | None = None) -> Any:
        with self._turn:
            self._syncs_waiting += 1
        try:
            return self._retry(lambda: _sync(self.pool, self.trainer, self.cfg.rollout.sync_dir, probe), "sync")
        finally:
            with self._turn:
                self._syncs_waiting -= 1
                self._turn.notify_all()

    def sleep(self) -> float:
        """Colocated: the engines free the GPU for the trainer (KV cache freed, weights to host memory)."""
        return self._retry(lambda: self.pool.sleep(1), "sleep")

    def wake(self) -> float:
        return self._retry(self.pool.wake, "wake")

    def _after_syncs(self) -> None:
        with self._turn:
            self._turn.wait_for(lambda: self._syncs_waiting == 0)

    def _retry(self, call: Any, what: str) -> Any:
        with self._lock:
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
        self.pool = RolloutPool(self.model, self.rollout, placement=self.placement)
        self._connect()
        self.restarts += 1
        # fresh engines hold the base weights: give them the trainer's
        _sync(self.pool, self.trainer, self.cfg.rollout.sync_dir)

    def _connect(self) -> None:
        """Direct weight sync (``rollout.sync_transport`` nccl/gloo): the trainer meets these engines."""
        if self.rollout.sync_transport != "shm":  # the weights travel in the engines' dtype
            wire = resolved_dtype(self.rollout.engine_dtype(self.model), cuda=self.rollout.gpus_per_engine > 0)
            self.trainer.open_transfer(self.pool, self.rollout, wire)

    def shutdown(self) -> None:
        self.pool.shutdown()


def _tagged(groups: list[list[Rollout]], version: int) -> list[list[Rollout]]:
    for group in groups:
        for r in group:
            r.policy_version = version
    return groups


def _sync(pool: RolloutPool, trainer: TrainerGroup, sync_dir: str, probe: Rollout | None = None) -> Any:
    """New trainer weights into every engine, then (with a probe) the logprob agreement check."""
    started = time.perf_counter()
    direct = pool.cfg.sync_transport != "shm"  # the trainer broadcasts into the engines: nothing staged
    update = trainer.send_weights() if direct else trainer.publish_weights(sync_dir)
    check = None
    if probe is not None:
        ids = list(probe.prompt_ids) + list(probe.token_ids)
        logprobs = trainer.reference_logprobs(ids, len(probe.prompt_ids))
        check = LogprobCheck(ids, len(probe.prompt_ids), logprobs)
    return pool.push(update, check, started=started if direct else None, fetch=lambda: trainer.staged_files_ref(update))


