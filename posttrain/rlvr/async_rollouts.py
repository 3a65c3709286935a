"""Rollouts produced ahead of training with bounded staleness (``run.max_staleness = k >= 1``).

One producer thread plays the steps' prompts (draws, generates, scores: ``loop.collect``) while the
controller trains on the oldest finished step; the two meet in :meth:`RolloutProducer.take`::

    producer  | collect(s+1) | collect(s+2)   ...      (engines busy)
    controller| learn(s)  sync | learn(s+1)  sync ...  (trainer busy)

Admission control: step ``t`` starts only once step ``t - k - 1`` has finished (trained, and its
weights on the engines), so its rollouts come from weights at most ``k`` updates older than the ones
that train on them. Generation waits rather than sample from older weights; steps are trained in
order, and a finished step is never dropped for being stale (dropping starves slow, hard prompts).
Weight syncs land between two generation calls (``actors.Engines`` lets a waiting sync go first); with
``run.segment_tokens`` the producer's calls stop every that many tokens, so a sync lands inside a step's
generation and its unfinished completions continue under the new weights (in-flight updates).

A run that stops (time cap, crash) loses the steps in flight: their prompts were drawn, none of their
rollouts trained or counted; a resumed run draws the next prompts.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from posttrain.rlvr.config import RLVRConfig
    from posttrain.rollout.types import Rollout

log = logging.getLogger(__name__)


class RolloutProducer:
    """``produce(step)`` run on a thread, up to ``k`` steps ahead of the last :meth:`finished` one."""

    def __init__(self, produce: Callable[[int], Any], k: int, first: int, end: int) -> None:
        if k < 1:
            raise ValueError(f"a producer runs ahead by k >= 1 steps (got {k}); k = 0 is the synchronous loop")
        self._produce, self.k, self._end = produce, k, end
        self._next = first  # the next step to produce
        self._finished = first - 1  # the last step trained and synced
        self._ready: dict[int, Any] = {}  # step -> its result, or the exception that ended production
        self._cond = threading.Condition()
        self._busy = self._paused = self._closed = False
        self._started = time.monotonic()
        self.busy_s = self.waited_s = 0.0  # producer working / controller waiting in take()
        self._thread = threading.Thread(target=self._run, name="rollout-producer", daemon=True)
        self._thread.start()

    def _admitted(self) -> bool:
        return not self._paused and self._next < self._end and self._next <= self._finished + 1 + self.k

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._admitted())
                if self._closed:
                    return
                step, self._busy = self._next, True
                self._next += 1
            start = time.monotonic()
            try:
                result: Any = self._produce(step)
            except BaseException as exc:  # handed to the controller by take()
                result = exc
            with self._cond:
                self.busy_s += time.monotonic() - start
                self._ready[step], self._busy = result, False
                self._cond.notify_all()
            if isinstance(result, BaseException):
                return

    def take(self, step: int) -> Any:
        """Step ``step``'s result once produced (the controller waits here when the producer is behind)."""
        start = time.monotonic()
        with self._cond:
            self._cond.wait_for(lambda: step in self._ready or any(
                isinstance(r, BaseException) for r in self._ready.values()))
            result = self._ready.pop(step, None)
            if result is None:  # production ended with an error before reaching this step
                result = next(r for r in self._ready.values() if isinstance(r, BaseException))
        self.waited_s += time.monotonic() - start
        if isinstance(result, BaseException):
            raise result
        return result

    def finished(self, step: int) -> None:
        """Step ``step`` is trained and its weights are on the engines: admit step ``step + k + 1``."""
        with self._cond:
            self._finished = step
            self._cond.notify_all()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """No step in production inside (held-out evals and checkpoints use the engines and environments)."""
        with self._cond:
            self._paused = True
            self._cond.wait_for(lambda: not self._busy)
        try:
            yield
        finally:
            with self._cond:
                self._paused = False
                self._cond.notify_all()

    def metrics(self) -> dict[str, float]:
        """Idle shares since the producer started: the trainer's (waiting for rollouts) and the engines'."""
        wall = max(time.monotonic() - self._started, 1e-9)
        return {"async/trainer_idle_share": min(1.0, self.waited_s / wall),
                "async/engine_idle_share": max(0.0, 1.0 - self.busy_s / wall),
                "async/steps_ahead": float(self._next - 1 - self._finished)}

    def close(self) -> None:
        """Stop producing; waits for the step in production (its engine calls cannot be cut short)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join()


def staleness_metrics(rollouts: list[Rollout], current: int, k: int) -> dict[str, float]:
    """How many updates old each rollout's weights are when it trains (``current`` = the trainer's
    updates so far; a rollout that spans in-flight updates counts by its oldest tokens): mean, max, the
    share at each lag 0..k, and the share of rollouts sampled by more than one version."""
    lags = [current - r.policy_version for r in rollouts]
    out = {"async/staleness_mean": sum(lags) / len(lags), "async/staleness_max": float(max(lags)),
           "async/spanning_share": sum(bool(r.version_changes) for r in rollouts) / len(rollouts)}
    for lag in range(k + 1):
        out[f"async/staleness_{lag}"] = sum(x == lag for x in lags) / len(lags)
    return out


def trainer_cores(cfg: RLVRConfig, rank: int) -> list[int] | None:
    """The CPU cores trainer worker ``rank`` keeps to in an asynchronous run on CPUs: the ones after the
    engines' (engine ``r`` binds cores ``r * t .. r * t + t - 1``, ``t = rollout.engine_threads()``), so
    training and generation, now at the same time, do not fight over cores. None: synchronous, or GPUs."""
    if not cfg.run.max_staleness or cfg.train.num_gpus:
        return None
    ncpu = os.cpu_count() or 1
    threads = cfg.train.threads or 1
    first = cfg.rollout.num_engines * cfg.rollout.engine_threads() + rank * threads
    if first + threads > ncpu:
        log.warning("run.max_staleness=%d: the engines (%d x %d threads) and trainer workers (%d threads each) need "
                    "more than this machine's %d cores: they share some, and overlap buys less", cfg.run.max_staleness,
                    cfg.rollout.num_engines, cfg.rollout.engine_threads(), threads, ncpu)
    return [(first + i) % ncpu for i in range(threads)]
