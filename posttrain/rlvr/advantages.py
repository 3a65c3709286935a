"""Group-relative advantages (GRPO family).

Every prompt gets a group of ``n`` rollouts; a rollout's advantage is its reward relative to
the others of its group, so no value network is needed:

- ``baseline="loo"`` (leave-one-out, the reference recipe and RLOO): ``b_i = mean_{j != i} r_j``.
  Unbiased: a rollout's own reward does not lower its baseline.
- ``baseline="mean"`` (original GRPO, Dr.GRPO): ``b = mean_j r_j``.
- ``scale="std"`` divides by the group's standard deviation (GRPO, the recipe);
  ``scale="none"`` keeps raw differences (Dr.GRPO, RLOO), which avoids up-weighting groups
  whose rewards barely differ.

A group whose rewards are all equal carries no signal (every advantage is 0); with
``drop_zero_variance`` its rollouts are masked out so they do not dilute the token mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.rlvr.config import Baseline, Scale


@dataclass(frozen=True)
class GroupAdvantages:
    advantages: torch.Tensor  # [G * n]
    keep: torch.Tensor  # [G * n] bool: False for rollouts of zero-variance groups (when dropped)
    zero_variance_groups: int


def group_advantages(rewards: torch.Tensor, group_size: int, *, baseline: Baseline = "loo",
                     scale: Scale = "std", eps: float = 1e-6, drop_zero_variance: bool = True) -> GroupAdvantages:
    """``rewards``: [G * n], groups contiguous (prompt 0's n rollouts, then prompt 1's, ...)."""
    if group_size < 2:
        raise ValueError(f"group-relative advantages need >= 2 rollouts per prompt (got {group_size})")
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of {group_size} entries (got shape {tuple(rewards.shape)})")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf; score_safely should have zeroed them")
    r = rewards.double().view(-1, group_size)  # [G, n]
    total = r.sum(dim=1, keepdim=True)
    if baseline == "loo":
        b = (total - r) / (group_size - 1)
    elif baseline == "mean":
        b = total / group_size
    else:
        raise ValueError(f"baseline must be 'loo' or 'mean' (got {baseline!r})")
    adv = r - b
    if scale == "std":
        adv = adv / (r.std(dim=1, keepdim=True) + eps)
    elif scale != "none":
        raise ValueError(f"scale must be 'std' or 'none' (got {scale!r})")
    zero_var = (r.max(dim=1).values - r.min(dim=1).values) <= 0  # [G]
    adv[zero_var] = 0.0
    keep = (~zero_var).unsqueeze(1).expand_as(r) if drop_zero_variance else torch.ones_like(r, dtype=torch.bool)
    return GroupAdvantages(adv.view(-1).to(rewards.dtype), keep.reshape(-1), int(zero_var.sum()))
