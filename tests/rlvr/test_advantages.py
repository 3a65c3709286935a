"""Group-relative advantages against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from posttrain.rlvr.advantages import group_advantages


def test_leave_one_out_without_scaling():
    # group [1, 0, 0, 1]: baseline of r0 = (0+0+1)/3 = 1/3 -> A0 = 2/3; of r1 = (1+0+1)/3 -> A1 = -2/3
    out = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4, baseline="loo", scale="none")
    assert torch.allclose(out.advantages, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    assert out.keep.all() and out.zero_variance_groups == 0


def test_mean_baseline_with_std_is_original_grpo():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    std = torch.tensor([1.0, 0.0, 0.0, 0.0]).std().item()  # unbiased: sqrt(0.25) = 0.5
    out = group_advantages(r, 4, baseline="mean", scale="std", eps=0.0)
    assert torch.allclose(out.advantages, torch.tensor([0.75, -0.25, -0.25, -0.25]) / std)


def test_loo_is_mean_baseline_rescaled():
    r = torch.tensor([0.3, 0.9, 0.1, 0.5, 1.0, 0.0])
    loo = group_advantages(r, 3, baseline="loo", scale="none").advantages
    mean = group_advantages(r, 3, baseline="mean", scale="none").advantages
    assert torch.allclose(loo, mean * 3 / 2)  # n / (n - 1)


def test_zero_variance_groups_are_dropped_or_kept():
    r = torch.tensor([1.0, 1.0, 0.0, 1.0])  # group 0 all ones, group 1 informative
    out = group_advantages(r, 2)
    assert out.zero_variance_groups == 1
    assert out.keep.tolist() == [False, False, True, True]
    assert out.advantages[:2].tolist() == [0.0, 0.0]
    kept = group_advantages(r, 2, drop_zero_variance=False)
    assert kept.keep.all() and kept.advantages[:2].tolist() == [0.0, 0.0]


def test_groups_are_independent():
    a = group_advantages(torch.tensor([1.0, 0.0, 5.0, 3.0]), 2, scale="none").advantages
    assert a.tolist() == [1.0, -1.0, 2.0, -2.0]


@pytest.mark.parametrize(
    ("rewards", "n", "message"),
    [(torch.tensor([1.0, 0.0]), 1, ">= 2 rollouts"), (torch.tensor([1.0, 0.0, 1.0]), 2, "multiple of 2"),
     (torch.tensor([float("nan"), 0.0]), 2, "NaN")],
)
def test_bad_input(rewards, n, message):
    with pytest.raises(ValueError, match=message):
        group_advantages(rewards, n)
