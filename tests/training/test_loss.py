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


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_weighted_grads_with_bias(temperature: float) -> None:
    from posttrain.training.loss import token_logprobs

    torch.manual_seed(1)
    hidden = torch.randn(40, 16, requires_grad=True)  # [N, H]
    weight = torch.randn(300, 16, requires_grad=True)  # [V, H]
    bias = torch.randn(300, requires_grad=True)
    targets = torch.randint(0, 300, (40,))
    coef = torch.randn(40)  # an advantage-like upstream gradient, signs mixed
    full = torch.log_softmax((hidden @ weight.T + bias) / temperature, dim=-1).gather(1, targets[:, None])[:, 0]
    ours = token_logprobs(hidden, weight, targets, bias, temperature, chunk_size=7)
    torch.testing.assert_close(ours, full, rtol=1e-5, atol=1e-5)
    g_full = torch.autograd.grad((coef * full).sum(), (hidden, weight, bias))
    g_ours = torch.autograd.grad((coef * ours).sum(), (hidden, weight, bias))
    for a, b in zip(g_ours, g_full):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_frozen_head_gets_no_gradient() -> None:
    from posttrain.training.loss import token_logprobs

    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(50, 8)  # frozen (LoRA): no gradient asked
    out = token_logprobs(hidden, weight, torch.randint(0, 50, (10,)), chunk_size=4)
    out.sum().backward()
    assert hidden.grad is not None and weight.grad is None


def _peak_bytes(fn) -> int:
    """Peak of live CPU tensor bytes created while ``fn`` runs: the profiler's memory timeline (the
    data behind its memory-timeline export; torch is pinned, so its private accessor is stable here)."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import Action

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        fn()
    live: dict = {}
    peak = 0
    for _, action, key, size in prof._memory_profile().timeline:
        if action == Action.CREATE:
            live[key] = size
        elif action == Action.DESTROY:
            live.pop(key, None)
        peak = max(peak, sum(live.values()))
    return peak


def test_one_logits_block_alive_in_backward() -> None:
    """The chunk's backward holds one [c, V] fp32 block (a checkpointed log_softmax holds three)."""
    from posttrain.training.loss import token_logprobs

    chunk, vocab = 64, 20_000
    hidden = torch.randn(chunk, 8, requires_grad=True)
    weight = torch.randn(vocab, 8, requires_grad=True)
    targets = torch.randint(0, vocab, (chunk,))
    out = token_logprobs(hidden, weight, targets, chunk_size=chunk).sum()
    block = chunk * vocab * 4
    peak = _peak_bytes(lambda: out.backward())
    assert block <= peak < 1.5 * block + weight.numel() * 4


def test_head_stays_fp32_under_autocast() -> None:
    """Under bf16 autocast (``train.mixed_precision: bf16``) the head and log-softmax still run in fp32:
    the logprobs equal the fp32 reference (a bf16 head is ~1e-2 off), the hidden state's gradient
    comes back in its own dtype and the head's in fp32."""
    from posttrain.training.loss import token_logprobs

    torch.manual_seed(2)
    hidden = torch.randn(30, 64).bfloat16().requires_grad_()  # a trunk's output under autocast
    weight = (torch.randn(500, 64) * 0.5).requires_grad_()
    targets = torch.randint(0, 500, (30,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = token_logprobs(hidden, weight, targets, chunk_size=8)
        with torch.no_grad():
            in_bf16 = torch.log_softmax(F.linear(hidden, weight).float(), -1).gather(1, targets[:, None])[:, 0]
    ref = torch.log_softmax(hidden.float() @ weight.T, -1).gather(1, targets[:, None])[:, 0]
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert float((in_bf16 - ref).abs().max()) > 1e-3  # what the head in bf16 would have given
    g_hidden, g_weight = torch.autograd.grad(ours.sum(), (hidden, weight))
    r_hidden, r_weight = torch.autograd.grad(ref.sum(), (hidden, weight))
    assert g_hidden.dtype == torch.bfloat16 and g_weight.dtype == torch.float32
    torch.testing.assert_close(g_weight, r_weight, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_hidden, r_hidden)
