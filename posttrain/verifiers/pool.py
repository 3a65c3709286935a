"""A pool of named Ray actors (``sandbox-0``, ``sandbox-1``…) that run untrusted programs.

Each actor runs one job at a time (its sandbox is a single-use resource), so
concurrency is bounded by the pool size; extra jobs wait in the pool's queue. A call that
exceeds ``call_timeout_s`` (the sandbox enforces its own, shorter wall limit, so this means
a stuck worker) or whose actor died is reported as an ``infra`` result and the actor is
restarted by Ray (``max_restarts``), keeping its name. Results carry timing and error kind.

A worker is never handed a job while it may still be running an earlier one: Ray would queue
the new job behind the old, and its innocent result would come back late, as ``infra``. So
a job abandoned mid-run (``arun`` cancelled from outside, as ``asyncio.wait_for`` in the RL
loop does, or timed out) leaves its worker *settling*: a background thread waits for that job
to end within its own time budget, or restarts the actor, and only then is it handed work.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future
from typing import Any

import ray

from posttrain.verifiers.code import INFRA, CodeResult, check_function, check_humaneval, check_io, run_program
from posttrain.verifiers.sandbox import Limits, detect_isolation

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CodeJob:
    """One program to score: a HumanEval-shaped ``problem`` and a ``completion``, I/O ``cases``, or
    ``function`` tests (``check_function`` keywords: entry_point, test, helpers) of the program.
    Or, with ``execute``, one program to run as a tool call (``run_program``): its printed output comes
    back in ``CodeResult.output``, cut to ``max_output_chars``, under the runner's limits with the wall
    limit lowered to ``timeout_s`` (a tool call gets less time than a whole scoring run)."""

    completion: str
    problem: dict[str, Any] | None = None
    cases: tuple[tuple[str, str], ...] = ()
    function: dict[str, str] | None = None
    execute: bool = False
    timeout_s: float | None = None
    max_output_chars: int = 4000


def run_job(job: CodeJob, limits: Limits | None = None, isolation: Any = None) -> CodeResult:
    """Score (or, ``execute``, run) one job in this process (the sandbox still isolates the program)."""
    if job.execute:
        limits = limits or Limits()
        if job.timeout_s is not None and job.timeout_s < limits.wall_s:
            limits = dataclasses.replace(limits, wall_s=job.timeout_s,
                                         cpu_s=max(1, min(limits.cpu_s, math.ceil(job.timeout_s))))
        return run_program(job.completion, max_output_chars=job.max_output_chars, limits=limits, isolation=isolation)
    if job.function is not None:
        return check_function(job.completion, limits=limits, isolation=isolation, **job.function)
    if job.problem is not None:
        return check_humaneval(job.problem, job.completion, limits=limits, isolation=isolation)
    return check_io(job.completion, job.cases, limits=limits, isolation=isolation)


class VerifierWorker:
    """Body of one ``sandbox-N`` actor: runs code jobs, one at a time. (Math answers need no
    sandbox: they are checked in the environment's own killable workers, ``MathCheckerPool``.)"""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self.isolation = detect_isolation()

    def describe(self) -> str:
        return self.isolation.describe()

    def run(self, job: CodeJob) -> CodeResult:
        return run_job(job, self.limits, self.isolation)


_DONE: Future[None] = Future()
_DONE.set_result(None)


def _infra(seconds: float, detail: str) -> CodeResult:
    return CodeResult(False, INFRA, seconds, detail)


class VerifierPool:
    """``map(jobs)`` -> results in job order, at most ``num_workers`` running at once.

    A job whose actor died is re-sent up to ``retries`` times; a job that ran past
    ``call_timeout_s`` is not (it would likely hang again) and comes back as ``infra``.
    """

    def __init__(self, num_workers: int = 2, limits: Limits | None = None,
                 call_timeout_s: float = 60.0, num_cpus_per_worker: float = 1.0, retries: int = 1,
                 name_prefix: str = "sandbox", placement: Any = None) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1 (got {num_workers})")
        if not ray.is_initialized():
            raise RuntimeError("call ray.init() before creating a VerifierPool")
        self.limits = limits or Limits()
        if call_timeout_s <= self.limits.wall_s:
            raise ValueError(f"call_timeout_s ({call_timeout_s}) must exceed the sandbox wall limit "
                             f"({self.limits.wall_s}) so a stuck worker is told apart from a slow program")
        self.call_timeout_s = call_timeout_s
        self.retries = retries  # re-sends of a job whose actor died (never of one that timed out)
        actor_cls = ray.remote(max_restarts=-1, max_task_retries=0, num_cpus=num_cpus_per_worker)(VerifierWorker)
        self.names = [f"{name_prefix}-{i}" for i in range(num_workers)]  # a second pool needs another prefix
        self.workers = [
            actor_cls.options(name=name, **({} if placement is None else {
                "scheduling_strategy": placement.slot("sandbox", i).scheduling_strategy()}))
            .remote(self.limits)
            for i, name in enumerate(self.names)]
        self.restarts = 0
        self._idle: weakref.WeakKeyDictionary[Any, asyncio.Queue[int]] = weakref.WeakKeyDictionary()
        self._settling: dict[int, Future[None]] = {}  # worker -> done once its abandoned job is over
        self._lock = threading.Lock()
        self._closed = False

    def describe(self) -> str:
        return ray.get(self.workers[0].describe.remote(), timeout=self.call_timeout_s)

    def map(self, jobs: list[CodeJob]) -> list[CodeResult]:
        """Run every job; a failure of the infrastructure becomes an ``infra`` result, never a 0."""
        results: list[Any] = [None] * len(jobs)
        queue = deque(range(len(jobs)))
        attempts = [0] * len(jobs)
        idle = deque(range(len(self.workers)))
        running: dict[Any, tuple[int, int, float]] = {}  # ref -> (job index, worker index, start)
        try:
            while queue or running:
                while queue and idle:
                    i, w = queue.popleft(), idle.popleft()
                    self._settled(w).result()  # an arun elsewhere may have abandoned a job on it
                    running[self.workers[w].run.remote(jobs[i])] = (i, w, time.monotonic())
                ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
                for ref in ready:
                    i, w, start = running.pop(ref)
                    try:
                        results[i] = ray.get(ref)
                    except ray.exceptions.RayError as exc:
                        attempts[i] += 1
                        self._wait_alive(w)  # e.g. the actor died: Ray restarts it
                        if attempts[i] <= self.retries:  # e.g. sent while the actor was restarting
                            queue.appendleft(i)
                        else:
                            detail = f"{self.names[w]} failed: {exc}"[:500]
                            results[i] = _infra(time.monotonic() - start, detail)
                    idle.append(w)
                now = time.monotonic()
                for ref, (i, w, start) in list(running.items()):
                    if now - start > self.call_timeout_s:
                        del running[ref]
                        self._restart(w)
                        detail = f"{self.names[w]} gave no result in {self.call_timeout_s}s; worker restarted"
                        results[i] = _infra(now - start, detail)
                        idle.append(w)
        finally:  # interrupted (KeyboardInterrupt...): these workers may still be busy
            for ref, (_, w, start) in running.items():
                self._settle_later(w, ref, start + self.call_timeout_s)
        return results

    async def arun(self, job: CodeJob) -> CodeResult:
        """One job from async code (an environment's ``score``): waits for an idle actor.

        Same rules as :meth:`map`: a dead actor's job is re-sent ``retries`` times, a stuck one
        restarts the actor and comes back as ``infra``. Cancelled from outside (a caller's
        timeout), the job is abandoned and its worker settles before its next job.
        """
        idle = self._idle_queue()
        w = await self._acquire(idle)
        busy: tuple[Any, float] | None = None  # (ref, deadline) of a job the actor may still run
        try:
            for attempt in range(self.retries + 1):
                start = time.monotonic()
                ref = self.workers[w].run.remote(job)
                busy = (ref, start + self.call_timeout_s)
                try:
                    result = await asyncio.wait_for(asyncio.wrap_future(ref.future()), self.call_timeout_s)
                    busy = None
                    return result
                except asyncio.TimeoutError:
                    busy = (ref, 0.0)  # stuck: restart it now, in the background
                    return _infra(time.monotonic() - start,
                                  f"{self.names[w]} gave no result in {self.call_timeout_s}s; worker restarted")
                except ray.exceptions.RayError as exc:
                    busy = None
                    if attempt == self.retries:
                        return _infra(time.monotonic() - start, f"{self.names[w]} failed: {exc}"[:500])
                    self._settle_later(w, ref, 0.0)  # it failed: wait until the actor answers again
                    await self._until_settled(w)
            raise AssertionError("unreachable")
        finally:
            if busy is not None:
                self._settle_later(w, *busy)
            idle.put_nowait(w)

    async def _acquire(self, idle: asyncio.Queue[int]) -> int:
        """An idle worker, once any job abandoned on it is over."""
        w = await idle.get()
        try:
            await self._until_settled(w)
        except BaseException:
            idle.put_nowait(w)
            raise
        return w

    async def _until_settled(self, w: int) -> None:
        # polled, not awaited through wrap_future: the settling thread may outlive this event
        # loop (the RL loop runs one per step), and must not call back into a closed one
        settling = self._settled(w)
        while not settling.done():
            await asyncio.sleep(0.05)

    def _settled(self, w: int) -> Future[None]:
        with self._lock:
            return self._settling.get(w) or _DONE

    def _settle_later(self, w: int, ref: Any, deadline: float) -> None:
        """Free worker ``w`` in the background once its abandoned job ``ref`` is over: let it finish
        by ``deadline`` (monotonic), else restart the actor. Until then ``w`` takes no job."""
        done: Future[None] = Future()
        with self._lock:
            self._settling[w] = done

        def settle() -> None:
            try:
                if not self._closed:
                    self._settle(w, ref, deadline)
            except Exception:  # noqa: BLE001 - a thread's error has nowhere else to go
                log.exception("settling verifier actor %s failed", self.names[w])
            finally:
                done.set_result(None)

        threading.Thread(target=settle, name=f"settle-{self.names[w]}", daemon=True).start()

    def _settle(self, w: int, ref: Any, deadline: float) -> None:
        try:
            ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
        except ray.exceptions.GetTimeoutError:
            self._restart(w)
        except ray.exceptions.RayError:  # the job failed or its actor died: wait until it answers
            self._wait_alive(w)

    def _idle_queue(self) -> asyncio.Queue[int]:
        """Idle worker indices, one queue per event loop (the RL loop runs one loop per step)."""
        loop = asyncio.get_running_loop()
        if loop not in self._idle:
            queue: asyncio.Queue[int] = asyncio.Queue()
            for w in range(len(self.workers)):
                queue.put_nowait(w)
            self._idle[loop] = queue
        return self._idle[loop]

    def _restart(self, w: int) -> None:
        """Kill a stuck actor; Ray restarts it under the same name (max_restarts=-1)."""
        log.warning("restarting stuck verifier actor %s", self.names[w])
        ray.kill(self.workers[w], no_restart=False)
        with self._lock:
            self.restarts += 1
        self._wait_alive(w)

    def _wait_alive(self, w: int, timeout_s: float = 120.0) -> None:
        """Block until actor ``w`` answers again (Ray fails calls sent while it restarts)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._closed:  # shut down: it will not come back, and no one waits for it
                return
            try:
                ray.get(self.workers[w].describe.remote(), timeout=max(1.0, deadline - time.monotonic()))
                return
            except ray.exceptions.RayError:
                time.sleep(0.2)
        raise RuntimeError(f"verifier actor {self.names[w]} did not come back within {timeout_s}s after a restart")

    def shutdown(self) -> None:
        self._closed = True  # settling threads stop waiting for actors that will not come back
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        self.workers = []
