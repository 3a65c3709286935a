"""Packing is exact: a packed (or padded) batch has the loss of its documents run one by one."""

from __future__ import annotations

import pytest
import torch

from posttrain.sft import data
from posttrain.sft.arith import generate
from posttrain.sft.config import DataConfig
from posttrain.sft.packing import (
    collate,
    collate_packed,
    group_micro_batches,
    packing_blocker,
    plan_steps,
    resolve_packing,
)
from posttrain.training.loss import IGNORE_INDEX, causal_lm_nll_sum


def test_grouping_respects_budget() -> None:
    lengths = [5, 3, 8, 2, 7]
    packs = group_micro_batches(lengths, range(5), 10, "pack")
    assert packs == [[0, 1], [2, 3], [4]]
    pads = group_micro_batches(lengths, range(5), 10, "pad")
    assert all(len(mb) * max(lengths[i] for i in mb) <= 10 for mb in pads)
    with pytest.raises(ValueError, match="sample 2 has 8 tokens"):
        group_micro_batches(lengths, range(5), 7, "pack")


def test_plan_is_deterministic_and_full() -> None:
    lengths = list(range(5, 45))
    a = plan_steps(lengths, max_tokens=64, micro_batches_per_step=2, epochs=2, seed=1, mode="pack")
    b = plan_steps(lengths, max_tokens=64, micro_batches_per_step=2, epochs=2, seed=1, mode="pack")
    assert a == b and all(len(step) == 2 for step in a)
    assert a != plan_steps(lengths, max_tokens=64, micro_batches_per_step=2, epochs=2, seed=2, mode="pack")
    assert len(plan_steps(lengths, max_tokens=64, micro_batches_per_step=2, epochs=2, seed=1, mode="pack",
                          max_steps=3)) == 3


def test_packed_labels_and_positions() -> None:
    batch = collate_packed([([1, 2, 3], [0, 1, 1]), ([4, 5], [1, 1])])
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3, IGNORE_INDEX, 5]]  # doc start never a target


def _docs(tokenizer) -> list[tuple[list[int], list[int]]]:
    cfg = DataConfig(reasoning_off_share=0.3, budget_cut_share=0.3)
    rows = generate(5, seed=11)
    samples = [data.tokenize(data.make_example(i, r["messages"], cfg, tokenizer), tokenizer) for i, r in enumerate(rows)]
    return [(s.input_ids, s.loss_mask) for s in samples]


def _one_by_one(model, docs) -> torch.Tensor:
    total, n = torch.zeros(()), 0
    for doc in docs:
        nll, k = causal_lm_nll_sum(model, collate([doc], "pad", 0))
        total, n = total + nll, n + k
    return total / n


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_llama_packs_exactly(tiny_llama_dir, tokenizer) -> None:
    model, docs = _load(tiny_llama_dir), _docs(tokenizer)
    assert resolve_packing("auto", model) == "pack"
    with torch.no_grad():
        ref = _one_by_one(model, docs)
        nll, n = causal_lm_nll_sum(model, collate(docs, "pack", 0), chunk_size=64)
        pad_nll, pad_n = causal_lm_nll_sum(model, collate(docs, "pad", tokenizer.pad_token_id))
    torch.testing.assert_close(nll / n, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pad_nll / pad_n, ref, rtol=1e-5, atol=1e-6)


def test_nemotron_h_packs_exactly(tiny_nemotron_dir, tokenizer) -> None:
    """auto packs NemotronH: its Mamba2 layers reset state per document (training.mamba_packing)."""
    from posttrain.training.mamba_packing import exact_packing_enabled

    model, docs = _load(tiny_nemotron_dir), _docs(tokenizer)
    assert packing_blocker(model) is None and not exact_packing_enabled(model)
    with torch.no_grad():
        packed = collate(docs[:2], "pack", 0)
        leaky = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        assert resolve_packing("auto", model) == "pack" and exact_packing_enabled(model)
        assert resolve_packing("pack", model) == "pack"
        exact = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        alone = model(input_ids=torch.tensor([docs[1][0]]), use_cache=False).logits  # [1, T1, V]
        ref = _one_by_one(model, docs)
        nll, n = causal_lm_nll_sum(model, collate(docs, "pack", 0), chunk_size=64)
        pad_nll, pad_n = causal_lm_nll_sum(model, collate(docs, "pad", tokenizer.pad_token_id))
    first = len(docs[0][0])
    assert (leaky[0, first:] - alone[0]).abs().max() > 1e-3  # transformers alone leaks Mamba state
    torch.testing.assert_close(exact[0, first:], alone[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(nll / n, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pad_nll / pad_n, ref, rtol=1e-5, atol=1e-6)


class GatedDeltaNet(torch.nn.Module):  # a recurrent layer kind with no seq_idx support here
    pass


def test_unsupported_recurrent_layers_fall_back_to_padding() -> None:
    model = torch.nn.Sequential(GatedDeltaNet())
    model.config = type("Config", (), {"_attn_implementation": "sdpa"})()
    assert "GatedDeltaNet" in (packing_blocker(model) or "")
    assert resolve_packing("auto", model) == "pad"
    with pytest.raises(ValueError, match="train.packing=pack is not exact"):
        resolve_packing("pack", model)
