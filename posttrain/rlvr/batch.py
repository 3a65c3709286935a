"""Rollouts -> padded training tensors.

A row is ``prompt_ids + token_ids`` right-padded to the longest row. Per-token quantities
(logprobs, masks) live on the *completion* grid ``[B, Tc]``: entry ``[i, j]`` is about
completion token ``j`` of rollout ``i``, which the model predicts at sequence position
``len(prompt_i) + j - 1``. ``targets_index`` holds those positions so the trainer can gather
exactly the logits it needs.

An episode's completion interleaves model turns and observations (tool results, the
environment's replies): its ``loss_mask`` keeps ``mask`` at 0 on observation tokens, so the
policy loss, importance ratios, mismatch and token counts see model tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from posttrain.rollout.types import Rollout


@dataclass
class TrainBatch:
    input_ids: torch.Tensor  # [B, T] prompt + completion, right-padded
    attention_mask: torch.Tensor  # [B, T]
    positions: torch.Tensor  # [B, Tc] sequence position that predicts completion token j
    completion_ids: torch.Tensor  # [B, Tc] the completion tokens (pad where mask is 0)
    mask: torch.Tensor  # [B, Tc] 1.0 on tokens that train
    rollout_logprobs: torch.Tensor  # [B, Tc] of the sampling engine
    advantages: torch.Tensor  # [B]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, rows: Sequence[int] | torch.Tensor) -> TrainBatch:
        idx = torch.as_tensor(rows, dtype=torch.long)
        return TrainBatch(*(getattr(self, f)[idx] for f in self.__dataclass_fields__))

    @property
    def num_tokens(self) -> int:
        return int(self.mask.sum())


def build_batch(rollouts: Sequence[Rollout], advantages: torch.Tensor, keep: torch.Tensor,
                pad_id: int) -> TrainBatch:
    """``keep`` [B] (bool/0-1) zeroes whole rollouts: dropped groups, overlong, scoring infra errors."""
    if len(rollouts) != advantages.numel() or len(rollouts) != keep.numel():
        raise ValueError(f"{len(rollouts)} rollouts, {advantages.numel()} advantages, {keep.numel()} keep flags")
    if not rollouts:
        raise ValueError("no rollouts to train on")
    seq_len = max(len(r.prompt_ids) + len(r.token_ids) for r in rollouts)
    comp_len = max(1, max(len(r.token_ids) for r in rollouts))
    b = len(rollouts)
    input_ids = torch.full((b, seq_len), pad_id, dtype=torch.long)
    attention = torch.zeros((b, seq_len), dtype=torch.long)
    positions = torch.zeros((b, comp_len), dtype=torch.long)
    completion = torch.full((b, comp_len), pad_id, dtype=torch.long)
    mask = torch.zeros((b, comp_len))
    rollout_lp = torch.zeros((b, comp_len))
    for i, r in enumerate(rollouts):
        p, c = len(r.prompt_ids), len(r.token_ids)
        if len(r.logprobs) != c:
            raise ValueError(f"rollout {i}: {c} tokens but {len(r.logprobs)} logprobs")
        if p == 0:
            raise ValueError(f"rollout {i}: empty prompt")
        input_ids[i, : p + c] = torch.tensor(list(r.prompt_ids) + list(r.token_ids))
        attention[i, : p + c] = 1
        positions[i, :c] = torch.arange(p - 1, p + c - 1)
        completion[i, :c] = torch.tensor(r.token_ids, dtype=torch.long)
        mask[i, :c] = float(bool(keep[i]))
        if r.loss_mask is not None:  # observation tokens and a budget's forced closing tag never train
            if len(r.loss_mask) != c:
                raise ValueError(f"rollout {i}: {c} tokens but a loss_mask of {len(r.loss_mask)}")
            mask[i, :c] *= torch.tensor(r.loss_mask, dtype=torch.float32)
        rollout_lp[i, :c] = torch.tensor(r.logprobs, dtype=torch.float32)
    return TrainBatch(input_ids, attention, positions, completion, mask, rollout_lp, advantages.float())


def micro_batches(batch: TrainBatch, max_tokens: int) -> list[list[int]]:
    """Rows grouped so each group's padded size (rows x longest row) stays within ``max_tokens``.

    Rows are sorted by length first so padding is small; a single row longer than
    ``max_tokens`` still forms its own group.
    """
    lengths = batch.attention_mask.sum(-1).tolist()
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        if current and (len(current) + 1) * max(lengths[j] for j in current + [i]) > max_tokens:
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    return groups
