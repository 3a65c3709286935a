"""transformers fallback (NemotronH MoE on vLLM-CPU), and failures that must be loud, not hangs."""

from __future__ import annotations

import time

import pytest

from posttrain.config import GenerationConfig, ModelConfig, RolloutConfig
from posttrain.rollout.pool import RolloutPool
from posttrain.rollout.types import BackendUnsupportedError, EngineCrashedError

PROMPT = [{"role": "user", "content": "Say hi."}]


def test_unsupported_arch_is_a_clear_error_without_fallback(ray_cluster):
    cfg = RolloutConfig(fallback_to_transformers=False, max_model_len=256)
    with pytest.raises(BackendUnsupportedError, match="rollout.backend=transformers"):
        RolloutPool(ModelConfig(name="tiny-nemotron-h"), cfg)


def test_nemotron_h_falls_back_to_transformers_then_crash_is_reported(ray_cluster):
    pool = RolloutPool(ModelConfig(name="tiny-nemotron-h"), RolloutConfig(max_model_len=256))
    try:
        assert pool.infos[0].backend == "transformers" and "MoE" in pool.infos[0].fallback_reason
        budget = 6
        groups = pool.generate([PROMPT, PROMPT], GenerationConfig(max_new_tokens=20, temperature=1.0,
                                                                  reasoning_budget=budget), n=2)
        for r in (r for g in groups for r in g):
            assert len(r.logprobs) == len(r.token_ids) > 0
            assert r.reasoning_closed and r.reasoning_tokens <= budget + 1 and r.answer.strip()
        import ray

        ray.kill(pool.actors[0])  # stands for an OOM kill or a segfault in the engine
        start = time.perf_counter()
        with pytest.raises(EngineCrashedError, match="rollout-0"):
            pool.generate([PROMPT], GenerationConfig(max_new_tokens=4))
        assert time.perf_counter() - start < 30
    finally:
        pool.shutdown()


class _Sleeper:
    def nap(self, seconds: float) -> str:
        time.sleep(seconds)
        return "awake"


def test_hung_actor_times_out_with_its_name(ray_cluster):
    import sys

    from ray import cloudpickle

    from posttrain.orchestration import cluster

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    actor = cluster.start_actor(_Sleeper, "sleeper-0", num_cpus=0)
    try:
        with pytest.raises(cluster.ActorTimeoutError, match="sleeper-0"):
            cluster.gather([actor.nap.remote(30)], ["sleeper-0"], timeout_s=1, what="nap")
        with pytest.raises(RuntimeError, match="already exists"):
            cluster.start_actor(_Sleeper, "sleeper-0", num_cpus=0)
    finally:
        cluster.kill_actor(actor)
