"""The Ray pool: named actors, bounded concurrency, results in order, restart of a stuck worker."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from posttrain.verifiers.code import CodeResult
from posttrain.verifiers.pool import CodeJob, VerifierPool
from posttrain.verifiers.sandbox import Limits

pytestmark = pytest.mark.slow  # a local Ray cluster takes 10-20 s to start

PROBLEM = {"task_id": "t", "prompt": "def add(a, b):\n", "entry_point": "add",
           "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n"}


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    temp_dir = tempfile.mkdtemp(prefix="/tmp/ptv-")  # short: Ray's socket paths have a length limit
    if ray.is_initialized():  # a Ray some earlier test left running has another namespace
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=temp_dir, namespace="verifiers-test",
             configure_logging=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_pool_runs_code_jobs_in_order(ray_local):
    pool = VerifierPool(num_workers=2, limits=Limits(wall_s=3), call_timeout_s=20)
    try:
        assert ray_local.get_actor("sandbox-0") and ray_local.get_actor("sandbox-1")
        print("pool isolation:", pool.describe())
        jobs = [CodeJob("    return a + b\n", PROBLEM), CodeJob("    return a - b\n", PROBLEM),
                CodeJob("    while True:\n        pass\n", PROBLEM),
                CodeJob("print(int(input()) * 2)\n", None, (("21", "42"),))]
        results = pool.map(jobs)
        assert all(type(r) is CodeResult for r in results)
        assert [r.kind for r in results] == ["passed", "wrong_answer", "timeout", "passed"]
        assert all(r.seconds > 0 for r in results)
    finally:
        pool.shutdown()


def test_stuck_worker_is_restarted_and_reported_as_infra(ray_local):
    pool = VerifierPool(num_workers=1, limits=Limits(wall_s=2), call_timeout_s=4)
    try:
        stuck = dict(PROBLEM, test="import time\ntime.sleep(60)\n")  # trusted-side test code hangs
        results = pool.map([CodeJob("    return a + b\n", stuck), CodeJob("    return a + b\n", PROBLEM)])
        assert results[0].kind == "infra" and results[0].reward is None and "restarted" in results[0].detail
        assert results[1].passed, results[1]
        assert pool.restarts == 1
        assert pool.map([CodeJob("    return a + b\n", PROBLEM)])[0].passed  # the restarted actor keeps working
    finally:
        pool.shutdown()


def test_code_env_scores_on_the_pool_it_is_started_with(ray_local):
    import asyncio

    from posttrain.environments.base import StageResources
    from posttrain.environments.code_env import CodeEnv

    env = CodeEnv()
    sample = env.samples("train", 0)[0]
    gold, wrong = CodeEnv.gold_answer(sample), "```python\ndef nothing():\n    pass\n```"
    pool = VerifierPool(num_workers=2, limits=Limits(wall_s=3), call_timeout_s=20)

    async def score_all():
        return await asyncio.gather(*(env.score(sample, c) for c in [gold, wrong] * 3))

    try:
        ray_local.kill(pool.workers[0], no_restart=False)  # sandbox-0 restarts: its job is re-sent
        env.start(StageResources(code_runner=pool))
        scores = asyncio.run(score_all())
        assert [s.reward for s in scores] == [1.0, 0.0] * 3, scores
        assert all(s.kind != "infra" for s in scores)
    finally:
        env.close()
        pool.shutdown()
    assert asyncio.run(env.score(sample, gold)).reward == 1.0  # closed: scored from this process


def test_job_cancelled_from_outside_does_not_leave_its_worker_busy(ray_local):
    """The RL loop's score timeout cancels ``arun``; the next, innocent job on that worker must
    still be scored (not queued behind the abandoned one and reported as infra): in the same
    event loop, and in the next one (the loop runs one per step)."""
    import asyncio

    pool = VerifierPool(num_workers=1, limits=Limits(wall_s=2), call_timeout_s=5)
    stuck = CodeJob("    return a + b\n", dict(PROBLEM, test="import time\ntime.sleep(60)\n"))
    innocent = CodeJob("    return a + b\n", PROBLEM)

    async def cancel_then(next_job: CodeJob | None):
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(pool.arun(stuck), 1.0)
        return None if next_job is None else await pool.arun(next_job)

    try:
        result = asyncio.run(cancel_then(innocent))
        assert result.passed and result.kind == "passed", result
        asyncio.run(cancel_then(None))
        result = asyncio.run(pool.arun(innocent))  # a fresh event loop, its worker still settling
        assert result.passed and result.kind == "passed", result
        assert pool.restarts == 2
        assert pool.map([innocent])[0].passed
    finally:
        pool.shutdown()
