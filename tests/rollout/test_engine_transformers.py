"""The transformers backend in-process (no Ray): greedy n samples, logprobs, full and LoRA sync."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.config import GenerationConfig, ModelConfig, RolloutConfig
from posttrain.rollout.engine import RolloutEngine
from posttrain.rollout.weight_sync import ShmPublisher, full_state_dict, sequence_logprobs

PROMPT = [{"role": "user", "content": "Count to three."}]


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    eng = RolloutEngine(ModelConfig(name=str(tiny_llama_dir)), RolloutConfig(backend="transformers"))
    yield eng
    eng.shutdown()


def test_greedy_samples_are_identical_and_logprobs_match_forward(engine, tiny_llama_dir):
    from posttrain import models

    group = engine.generate([PROMPT], GenerationConfig(max_new_tokens=10, enable_thinking=False), n=2)[0]
    assert group[0].token_ids == group[1].token_ids and group[0].reasoning is None
    model = models.load_model(str(tiny_llama_dir), device="cpu")
    r = group[0]
    ref = sequence_logprobs(model, r.prompt_ids + r.token_ids, len(r.prompt_ids))
    assert max(abs(a - b) for a, b in zip(r.logprobs, ref)) < 1e-4


def test_top_logprobs_hold_the_chosen_token_and_the_likeliest_ones(engine):
    gen = GenerationConfig(max_new_tokens=6, enable_thinking=False, top_logprobs=4)
    r = engine.generate([PROMPT], gen)[0][0]
    assert len(r.top_tokens) == len(r.token_ids)
    texts = engine.tokenizer.batch_decode([[t] for t in r.token_ids])
    for (token, top), text, logprob in zip(r.top_tokens, texts, r.logprobs):
        assert token == text and len(top) <= 5 and sum(math.exp(v) for v in top.values()) <= 1 + 1e-5
        assert top[token] >= logprob - 1e-6  # ids that decode alike are merged: at least its own mass
        assert logprob >= max(top.values()) - 1e-5 or top[token] > logprob  # greedy: the likeliest
    assert engine.generate([PROMPT], GenerationConfig(max_new_tokens=2))[0][0].top_tokens is None


def test_full_and_lora_updates(engine, tiny_llama_dir):
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from posttrain import models

    model = models.load_model(str(tiny_llama_dir), device="cpu")
    seq, start = list(range(200, 230)), 4
    before = engine.score([seq], [start])[0]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    publisher = ShmPublisher()
    try:
        update = publisher.publish(get_peft_model_state_dict(peft_model), "lora",
                                   peft_model.peft_config["default"].to_dict())
        engine.apply_weights(update)
        got = engine.score([seq], [start])[0]
        assert max(abs(a - b) for a, b in zip(got, sequence_logprobs(peft_model, seq, start))) < 1e-4
        base = peft_model.unload()
        engine.apply_weights(publisher.publish(full_state_dict(base), "full"))  # drops the adapter
        assert engine.score([seq], [start])[0] == pytest.approx(before, abs=1e-6)
    finally:
        publisher.close()


def test_the_budgets_forced_closing_tag_never_trains(engine):
    """A random tiny model never closes its reasoning: budget 4 forces the tag. Those positions are
    masked in single-turn rollouts and in episode turns (generate_ids), every other token trains."""
    from posttrain.rollout.types import TokenRequest

    gen = GenerationConfig(max_new_tokens=16, enable_thinking=True, reasoning_budget=4)
    single = engine.generate([PROMPT], gen)[0][0]
    spec = engine._spec(4)
    closes = (spec.close_after_newline, spec.close_mid_line)
    forced = [k for k, m in enumerate(single.loss_mask) if not m]
    assert tuple(single.token_ids[k] for k in forced) in closes and forced[0] >= 4
    turn = engine.generate_ids([TokenRequest(single.prompt_ids, True, 0, 16)], gen)[0]
    assert tuple(turn.token_ids[k] for k in turn.forced) in closes and turn.reasoning_tokens >= 4
    assert not engine.generate_ids([TokenRequest(single.prompt_ids, False, 0, 16)], gen)[0].forced


def test_a_continued_completion_equals_one_uninterrupted_call(engine):
    """In-flight updates cut completions into segments: continued under the same weights, greedy, they are
    the one-call completion token for token, with its logprobs and its budget's forced tag (budget 4 and
    segments of 5 cut inside the forced tag)."""
    gen = GenerationConfig(max_new_tokens=16, enable_thinking=True, reasoning_budget=4)
    whole = engine.generate([PROMPT], gen)[0][0]
    r = engine.generate([PROMPT], gen.model_copy(update={"max_new_tokens": 5}))[0][0]
    while r.finish_reason == "length" and len(r.token_ids) < 16:
        r = engine.extend([r], gen, [min(5, 16 - len(r.token_ids))], [7])[0]
    assert r.token_ids == whole.token_ids and r.loss_mask == whole.loss_mask and 0 in r.loss_mask
    assert (r.reasoning_tokens, r.text, r.finish_reason) == (whole.reasoning_tokens, whole.text, whole.finish_reason)
    assert r.logprobs == pytest.approx(whole.logprobs, abs=1e-4)


def test_direct_weight_transfer_is_refused_with_the_fix(engine):
    from posttrain.rollout.types import RolloutError

    with pytest.raises(RolloutError, match="sync_transport=shm"):
        engine.weight_transfer("start_weight_update")
