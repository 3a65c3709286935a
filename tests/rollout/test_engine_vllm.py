"""The vLLM engine through Ray on a tiny model: samples, logprobs, budget, weight sync."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.config import GenerationConfig, ModelConfig, RolloutConfig
from posttrain.rollout.pool import LogprobCheck, RolloutPool
from posttrain.rollout.weight_sync import full_state_dict

PROMPTS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}],
    [{"role": "user", "content": "Write a haiku about rain."}],
]


@pytest.fixture(scope="module")
def pool(ray_cluster, tiny_llama_dir):
    cfg = RolloutConfig(max_model_len=512, kv_cache_gib=1, enable_lora=True, max_lora_rank=8)
    with RolloutPool(ModelConfig(name=str(tiny_llama_dir)), cfg) as p:
        yield p


@pytest.fixture(scope="module")
def hf_model(tiny_llama_dir):
    from posttrain import models

    return models.load_model(str(tiny_llama_dir), device="cpu")


def test_runs_vllm_as_named_actor(pool):
    import ray

    assert pool.infos[0].backend == "vllm" and pool.infos[0].fallback_reason is None
    info = ray.get(ray.get_actor("rollout-0").info.remote())  # the name finds the pool's own engine
    assert (info.name, info.backend, info.pid) == ("rollout-0", "vllm", pool.infos[0].pid)


def test_n_samples_with_logprobs(pool):
    gen = GenerationConfig(max_new_tokens=24, temperature=1.0, seed=3)
    groups = pool.generate(PROMPTS + PROMPTS[:1], gen, n=3)
    assert [len(g) for g in groups] == [3, 3, 3, 3]
    assert groups[3][0].token_ids != groups[0][0].token_ids  # a repeated prompt gets its own samples
    for p, group in enumerate(groups):
        assert [r.prompt_index for r in group] == [p] * 3 and [r.sample_index for r in group] == [0, 1, 2]
        for r in group:
            assert 0 < len(r.token_ids) <= 24 and len(r.logprobs) == len(r.token_ids)
            assert all(math.isfinite(lp) and lp <= 0 for lp in r.logprobs)
            assert r.finish_reason in ("stop", "length") and r.engine == "rollout-0"
            assert r.reasoning is not None  # thinking on by default
    assert len({tuple(r.token_ids) for r in groups[0]}) > 1  # samples differ
    again = pool.generate(PROMPTS[:1], gen, n=3)  # same seed and position: reproducible
    assert [r.token_ids for r in again[0]] == [r.token_ids for r in groups[0]]


def test_top_logprobs_hold_the_chosen_token_and_the_likeliest_ones(pool, tokenizer):
    r = pool.generate(PROMPTS[:1], GenerationConfig(max_new_tokens=6, enable_thinking=False, top_logprobs=3))[0][0]
    assert len(r.top_tokens) == len(r.token_ids)
    for (token, top), tid, logprob in zip(r.top_tokens, r.token_ids, r.logprobs):
        assert token == tokenizer.decode([tid]) and len(top) <= 4 and sum(math.exp(v) for v in top.values()) <= 1.001
        assert top[token] >= logprob - 1e-6  # ids that decode alike are merged: at least its own mass
        assert logprob >= max(top.values()) - 1e-4 or top[token] > logprob  # greedy: the likeliest


def test_thinking_budget_is_enforced(pool, tokenizer):
    budget = 12
    gen = GenerationConfig(max_new_tokens=48, temperature=1.0, reasoning_budget=budget)
    grace = math.ceil(budget * 0.1)
    close = tokenizer.encode("</think>", add_special_tokens=False)
    for r in (r for group in pool.generate(PROMPTS, gen, n=2) for r in group):
        assert r.reasoning_closed, r.text
        assert r.reasoning_tokens <= budget + grace
        starts = [i for i in range(len(r.token_ids)) if r.token_ids[i : i + len(close)] == close]
        assert starts and starts[0] <= budget + grace + 1  # + 1: a forced "\n" before a mid-line cut
        assert r.answer.strip(), f"no answer after the forced </think>: {r.text!r}"


def test_continued_completions_equal_uninterrupted_ones(pool):
    """In-flight updates: completions cut every 5 tokens and continued (on any engine, under the same
    weights) are the one-call ones, greedy: same tokens, logprobs, and the budget's forced tag in place."""
    gen = GenerationConfig(max_new_tokens=20, temperature=0.0, reasoning_budget=6)
    whole = [g[0] for g in pool.generate(PROMPTS, gen)]
    cut = [g[0] for g in pool.generate(PROMPTS, gen.model_copy(update={"max_new_tokens": 5}))]
    while open_ := [k for k, r in enumerate(cut) if r.finish_reason == "length" and len(r.token_ids) < 20]:
        done = pool.extend([cut[k] for k in open_], gen, [min(5, 20 - len(cut[k].token_ids)) for k in open_], open_)
        for k, r in zip(open_, done):
            cut[k] = r
    for r, ref in zip(cut, whole):
        assert (r.token_ids, r.loss_mask, r.reasoning_tokens) == (ref.token_ids, ref.loss_mask, ref.reasoning_tokens)
        assert r.logprobs == pytest.approx(ref.logprobs, abs=1e-4)
    assert any(r.loss_mask for r in whole)  # the budget forced its tag somewhere


def test_thinking_off_has_no_reasoning(pool):
    gen = GenerationConfig(max_new_tokens=8, enable_thinking=False, reasoning_budget=2)
    for r in pool.generate(PROMPTS[:2], gen)[0]:
        assert r.reasoning is None and r.reasoning_tokens == 0


def test_logprobs_match_transformers(pool, hf_model):
    """Teacher-forced and sampled logprobs of vLLM vs an HF forward (fp32: ~1e-6)."""
    r = pool.generate(PROMPTS[:1], GenerationConfig(max_new_tokens=16, temperature=1.0))[0][0]
    check = LogprobCheck.from_model(hf_model, r.prompt_ids + r.token_ids, len(r.prompt_ids))
    assert pool.logprob_diff(check) < 1e-4
    assert max(abs(a - b) for a, b in zip(r.logprobs, check.logprobs)) < 1e-4  # T=1: policy == model


def test_sync_changes_output_and_restores_it(pool, hf_model):
    gen = GenerationConfig(max_new_tokens=16, enable_thinking=False)
    before = pool.generate(PROMPTS, gen)
    original = {k: v.clone() for k, v in full_state_dict(hf_model).items()}
    fixed = before[0][0].prompt_ids + before[0][0].token_ids
    try:
        with torch.no_grad():
            for p in hf_model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        report = pool.sync_weights(full_state_dict(hf_model),
                                   check=LogprobCheck.from_model(hf_model, fixed, len(before[0][0].prompt_ids)))
        assert report.max_abs_logprob_diff is not None and report.max_abs_logprob_diff < 1e-4
        assert report.num_bytes > 0 and report.seconds > 0
        assert report.metrics()["sync/max_abs_logprob_diff"] == report.max_abs_logprob_diff
        changed = pool.generate(PROMPTS, gen)
        assert [g[0].token_ids for g in changed] != [g[0].token_ids for g in before]
    finally:
        hf_model.load_state_dict(original, strict=False)
        restore = pool.sync_weights(original)
    assert restore.kind == "full"
    after = pool.generate(PROMPTS, gen)
    assert [g[0].token_ids for g in after] == [g[0].token_ids for g in before]
    assert [g[0].logprobs for g in after] == [g[0].logprobs for g in before]


def test_lora_sync_matches_peft_and_full_sync_drops_it(pool, hf_model):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    gen = GenerationConfig(max_new_tokens=12, enable_thinking=False)
    base = pool.generate(PROMPTS[:1], gen)[0][0]
    fixed = base.prompt_ids + base.token_ids
    original = {k: v.clone() for k, v in full_state_dict(hf_model).items()}
    peft_model = get_peft_model(hf_model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    try:
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        report = pool.sync_weights(get_peft_model_state_dict(peft_model), "lora",
                                   lora_config=peft_model.peft_config["default"].to_dict(),
                                   check=LogprobCheck.from_model(peft_model, fixed, len(base.prompt_ids)))
        assert report.kind == "lora" and report.max_abs_logprob_diff < 1e-3
        assert pool.generate(PROMPTS[:1], gen)[0][0].token_ids != base.token_ids
    finally:
        hf_model = peft_model.unload()
        hf_model.load_state_dict(original, strict=False)
    pool.sync_weights(original)  # full weights replace the adapter
    assert pool.generate(PROMPTS[:1], gen)[0][0].token_ids == base.token_ids


def test_seeded_sampling_of_a_batch_larger_than_one_prefill(pool):
    """vLLM-CPU rewinds a seeded generator after a chunked prefill and the CPU generator refuses
    ("CPU Generator does not use offset"): the engine prefills whole prompts on CPU."""
    long = [[{"role": "user", "content": f"Item {i}: " + "tell me more about the weather " * 40}] for i in range(24)]
    groups = pool.generate(long, GenerationConfig(max_new_tokens=4, temperature=1.0, seed=123), n=4)
    assert len(groups) == 24 and all(len(g) == 4 and all(r.token_ids for r in g) for g in groups)


def test_sync_in_parts_as_a_sharded_trainer_stages_it(pool, hf_model):
    """A sharded trainer gathers one tensor at a time and stages them in several files
    (``publish_stream``); the engine loads every part and the logprob check still holds."""
    from posttrain.rollout.weight_sync import ShmPublisher, weight_files

    gen = GenerationConfig(max_new_tokens=8, enable_thinking=False)
    first = pool.generate(PROMPTS[:1], gen)[0][0]
    original = {k: v.clone() for k, v in full_state_dict(hf_model).items()}
    fixed = first.prompt_ids + first.token_ids
    publisher = ShmPublisher()
    try:
        with torch.no_grad():
            for p in hf_model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        update = publisher.publish_stream(iter(full_state_dict(hf_model).items()), max_file_bytes=1 << 20)
        assert len(weight_files(update.path)) > 1 and update.num_tensors == len(original)
        report = pool.push(update, LogprobCheck.from_model(hf_model, fixed, len(first.prompt_ids)))
        assert report.max_abs_logprob_diff is not None and report.max_abs_logprob_diff < 1e-4
    finally:
        hf_model.load_state_dict(original, strict=False)
        pool.sync_weights(original)
        publisher.close()


def test_a_bf16_engine_takes_the_fp32_trainers_weights(ray_cluster, tiny_llama_dir, hf_model):
    """``rollout.dtype: bfloat16`` (an fp32 trainer, as ``train.mixed_precision: bf16`` keeps it): the engine
    computes in bf16 -- its logprobs differ from the fp32 forward by more than fp32 noise, yet stay close --
    and an fp32 weight update is cast on load: output changes and the logprob check stays at bf16 level."""
    cfg = RolloutConfig(max_model_len=512, kv_cache_gib=1, dtype="bfloat16")
    gen = GenerationConfig(max_new_tokens=12, temperature=1.0, enable_thinking=False)
    original = {k: v.clone() for k, v in full_state_dict(hf_model).items()}
    with RolloutPool(ModelConfig(name=str(tiny_llama_dir)), cfg, name_prefix="bf16") as bf16_pool:
        r = bf16_pool.generate(PROMPTS[:1], gen)[0][0]
        greedy = GenerationConfig(max_new_tokens=12, enable_thinking=False)
        before = [g[0].token_ids for g in bf16_pool.generate(PROMPTS, greedy)]
        check = LogprobCheck.from_model(hf_model, r.prompt_ids + r.token_ids, len(r.prompt_ids))
        assert 1e-4 < bf16_pool.logprob_diff(check) < 0.1
        try:
            with torch.no_grad():
                for p in hf_model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
            report = bf16_pool.sync_weights(full_state_dict(hf_model), check=LogprobCheck.from_model(
                hf_model, r.prompt_ids + r.token_ids, len(r.prompt_ids)))
            assert report.max_abs_logprob_diff is not None and 1e-4 < report.max_abs_logprob_diff < 0.1
            assert [g[0].token_ids for g in bf16_pool.generate(PROMPTS, greedy)] != before
        finally:
            hf_model.load_state_dict(original, strict=False)


@pytest.mark.gpu
def test_a_sleeping_engine_frees_the_gpu_and_wakes_with_the_same_weights(ray_cluster, tiny_llama_dir):
    """run.colocate's engine side through the pool: sleep frees device memory, wake restores the weights."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA: vLLM sleeps only on GPUs")
    cfg = RolloutConfig(max_model_len=512, gpus_per_engine=0.5, gpu_memory_utilization=0.3, enable_sleep_mode=True)
    greedy = GenerationConfig(max_new_tokens=12, enable_thinking=False)
    with RolloutPool(ModelConfig(name=str(tiny_llama_dir)), cfg, name_prefix="sleepy") as sleepy:
        before = [g[0].token_ids for g in sleepy.generate(PROMPTS, greedy)]
        awake = torch.cuda.mem_get_info()[0]
        assert sleepy.sleep() >= 0
        assert torch.cuda.mem_get_info()[0] > awake
        assert sleepy.wake() >= 0
        assert [g[0].token_ids for g in sleepy.generate(PROMPTS, greedy)] == before
