"""The clipped, importance-corrected policy loss against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from posttrain.rlvr.policy_loss import LossConfig, overlong_mask, policy_loss, sequence_mismatch

NO_IS = LossConfig(importance_sampling=False, seq_error_threshold=None)


def lp(*probs):
    return torch.tensor([[math.log(p) for p in probs]])


def test_on_policy_loss_is_minus_advantage_and_gradient_matches():
    logp = lp(0.5, 0.25).requires_grad_()
    out = policy_loss(logp, logp.detach(), logp.detach(), torch.tensor([2.0]), torch.ones(1, 2), NO_IS)
    assert out.loss.item() == pytest.approx(-2.0)  # ratio 1: -A per token, token mean
    out.loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-1.0, -1.0]]))  # d(-A*ratio)/dlogp / 2 tokens


def test_asymmetric_clipping():
    old = lp(0.5, 0.5, 0.5)
    new = torch.log(torch.tensor([[0.5 * 1.5, 0.5 * 0.5, 0.5 * 1.1]]))  # ratios 1.5, 0.5, 1.1
    pos = policy_loss(new, old, old, torch.tensor([1.0]), torch.ones(1, 3), NO_IS)
    # A > 0: min(r, clip(r, 0.8, 1.28)) -> 1.28, 0.5, 1.1
    assert pos.loss.item() == pytest.approx(-(1.28 + 0.5 + 1.1) / 3)
    neg = policy_loss(new, old, old, torch.tensor([-1.0]), torch.ones(1, 3), NO_IS)
    # A < 0: -min(-r, -clip(r)) = max(r, clip(r)) -> 1.5, 0.8, 1.1
    assert neg.loss.item() == pytest.approx((1.5 + 0.8 + 1.1) / 3)
    assert pos.metrics["loss/clip_fraction"] == pytest.approx(2 / 3)


def test_importance_weight_is_truncated():
    old = lp(0.5, 0.5)
    rollout = lp(0.25, 0.1)  # weights 2.0 and 5.0 -> capped at 2.0
    cfg = LossConfig(seq_error_threshold=None, is_cap=2.0)
    out = policy_loss(old, old, rollout, torch.tensor([1.0]), torch.ones(1, 2), cfg)
    assert out.loss.item() == pytest.approx(-(2.0 + 2.0) / 2)
    assert out.metrics["loss/is_weight_max"] == pytest.approx(2.0)  # the cap, not 5
    lagged = lp(0.5, 0.4)  # a policy one update behind the trainer: weights 1.0 and 1.25, under the cap
    out = policy_loss(old, old, lagged, torch.tensor([1.0]), torch.ones(1, 2), cfg)
    assert out.loss.item() == pytest.approx(-(1.0 + 1.25) / 2)
    assert out.metrics["loss/is_weight_max"] == pytest.approx(1.25)


def test_sequences_with_large_mismatch_are_masked():
    old = torch.cat([lp(0.5, 0.5), lp(0.5, 0.5)])
    rollout = torch.cat([lp(0.5, 0.45), lp(0.05, 0.05)])  # second: exp(mean|diff|) = 10 > 2
    assert sequence_mismatch(old, rollout, torch.ones(2, 2))[1].item() == pytest.approx(10.0)
    out = policy_loss(old, old, rollout, torch.tensor([1.0, 1.0]), torch.ones(2, 2), LossConfig())
    assert out.mask[1].sum() == 0 and out.mask[0].sum() == 2
    assert out.metrics["mismatch/masked_sequences"] == 1


def test_k3_kl_term():
    new, ref = lp(0.5), lp(0.25)
    cfg = LossConfig(importance_sampling=False, seq_error_threshold=None, kl_coef=0.1)
    out = policy_loss(new, new, new, torch.tensor([0.0]), torch.ones(1, 1), cfg, logp_ref=ref)
    k3 = 0.5 - math.log(0.5) - 1  # exp(d) - d - 1 with d = log(0.25 / 0.5)
    assert out.loss.item() == pytest.approx(0.1 * k3)
    assert out.metrics["loss/kl"] == pytest.approx(k3)


def test_aggregations_weigh_tokens_differently():
    logp = torch.zeros(2, 3)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, 3.0])
    def run(agg, **kw):
        cfg = LossConfig(importance_sampling=False, seq_error_threshold=None, aggregation=agg, **kw)
        return policy_loss(logp, logp, logp, adv, mask, cfg).loss.item()
    assert run("token_mean") == pytest.approx(-(1 + 1 + 1 + 3) / 4)
    assert run("seq_mean_token_mean") == pytest.approx(-(1 + 3) / 2)
    assert run("seq_mean_token_sum_norm", sum_norm=10) == pytest.approx(-(3 / 10 + 3 / 10) / 2)


def test_micro_batches_sum_to_the_batch_token_mean():
    logp = torch.randn(4, 5)
    mask = (torch.rand(4, 5) > 0.3).float()
    adv = torch.randn(4)
    full = policy_loss(logp, logp, logp, adv, mask, NO_IS).loss
    total = mask.sum().item()
    parts = sum(policy_loss(logp[i:i + 2], logp[i:i + 2], logp[i:i + 2], adv[i:i + 2], mask[i:i + 2], NO_IS,
                            total_tokens=total).loss for i in (0, 2))
    assert parts.item() == pytest.approx(full.item(), abs=1e-6)


def test_overlong_mask():
    assert overlong_mask(["stop", "length", "stop"]).tolist() == [1.0, 0.0, 1.0]
