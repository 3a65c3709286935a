"""Several engines serve one batch: prompts are spread in order, every engine takes a share."""

from __future__ import annotations

import pytest

from posttrain.config import GenerationConfig, ModelConfig, RolloutConfig
from posttrain.rollout.pool import RolloutPool

PROMPTS = [[{"role": "user", "content": f"Give me the number {i}."}] for i in range(5)]


def _check_spread(pool: RolloutPool) -> None:
    groups = pool.generate(PROMPTS, GenerationConfig(max_new_tokens=6, temperature=1.0), n=2)
    assert [g[0].prompt_index for g in groups] == list(range(5))
    assert {r.engine for g in groups for r in g} == {"rollout-0", "rollout-1"}
    assert [g[0].engine for g in groups] == ["rollout-0"] * 3 + ["rollout-1"] * 2


def test_two_transformers_engines_share_a_batch(ray_cluster, tiny_llama_dir):
    cfg = RolloutConfig(backend="transformers", num_engines=2)
    with RolloutPool(ModelConfig(name=str(tiny_llama_dir)), cfg) as pool:
        _check_spread(pool)


@pytest.mark.slow
def test_two_vllm_engines_on_their_own_cores(ray_cluster, tiny_llama_dir):
    cfg = RolloutConfig(num_engines=2, max_model_len=256)
    with RolloutPool(ModelConfig(name=str(tiny_llama_dir)), cfg) as pool:
        assert [i.backend for i in pool.infos] == ["vllm", "vllm"]
        _check_spread(pool)
        from posttrain import models
        from posttrain.rollout.pool import LogprobCheck

        r = pool.generate(PROMPTS[:1], GenerationConfig(max_new_tokens=8))[0][0]
        check = LogprobCheck.from_model(models.load_model(str(tiny_llama_dir), device="cpu"),
                                        r.prompt_ids + r.token_ids, len(r.prompt_ids))
        assert pool.logprob_diff(check) < 1e-4  # max over both engines
