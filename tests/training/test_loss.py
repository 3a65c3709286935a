"""Chunked cross-entropy equals the full-logits loss, values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from posttrain.training.loss import IGNORE_INDEX, causal_lm_nll_sum, chunked_nll_sum, shifted_targets


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
def test_chunked_matches_full_logits(chunk: int) -> None:
    torch.manual_seed(0)
    hidden = torch.randn(50, 16, requires_grad=True)  # [N, H]
    weight = torch.randn(300, 16, requires_grad=True)  # [V, H]
    targets = torch.randint(0, 300, (50,))
    full = F.cross_entropy(hidden @ weight.T, targets, reduction="sum")
    g_full = torch.autograd.grad(full, (hidden, weight))
    ours = chunked_nll_sum(hidden, weight, targets, chunk_size=chunk)
    g_ours = torch.autograd.grad(ours, (hidden, weight))
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-4)
    for a, b in zip(g_ours, g_full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_empty_and_bad_chunk() -> None:
    assert float(chunked_nll_sum(torch.zeros(0, 4), torch.zeros(3, 4), torch.zeros(0, dtype=torch.long))) == 0.0
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_nll_sum(torch.zeros(1, 4), torch.zeros(3, 4), torch.zeros(1, dtype=torch.long), chunk_size=0)


def test_shifted_targets() -> None:
    labels = torch.tensor([[IGNORE_INDEX, 5, 6, IGNORE_INDEX]])
    assert shifted_targets(labels).tolist() == [[5, 6, IGNORE_INDEX, IGNORE_INDEX]]


def test_matches_hf_loss(tiny_llama_dir) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (2, 24))  # [B, T]
    labels = ids.clone()
    labels[:, :10] = IGNORE_INDEX
    nll, n = causal_lm_nll_sum(model, {"input_ids": ids, "labels": labels}, chunk_size=5)
    ref = model(input_ids=ids, labels=labels).loss
    assert n == 2 * 14  # labels 10..23 of each row
    torch.testing.assert_close(nll / n, ref, rtol=1e-5, atol=1e-5)
