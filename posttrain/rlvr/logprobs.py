"""Trainer-side per-token logprobs of completions, without ``[tokens, vocab]`` logits.

The trunk runs once; the LM head is applied only at the positions that predict completion
tokens, a chunk at a time (``training.loss.token_logprobs``), so the extra memory is one
``[chunk, vocab]`` block however long the rollouts are.
Logits are divided by the sampling temperature: the engine's logprobs are those of the
tempered policy it sampled from, and the ratio must compare like with like.
"""

from __future__ import annotations

from typing import Any

import torch

from posttrain.rlvr.batch import TrainBatch
from posttrain.training.loss import IGNORE_INDEX, in_root, token_logprobs, trunk_and_head


def completion_logprobs(model: Any, batch: TrainBatch, temperature: float = 1.0,
                        chunk_size: int = 1024) -> torch.Tensor:
    """``[B, Tc]`` logprobs of the completion tokens where ``batch.mask`` is set (0 elsewhere)."""
    return in_root(model, _completion_logprobs, model, batch, temperature, chunk_size)


def _completion_logprobs(model: Any, batch: TrainBatch, temperature: float, chunk_size: int) -> torch.Tensor:
    trunk, head = trunk_and_head(model)
    device = head.weight.device
    hidden = trunk(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device),
                   use_cache=False).last_hidden_state  # [B, T, H]
    keep = batch.mask.to(device) > 0  # [B, Tc]
    rows = torch.arange(len(batch), device=device)[:, None].expand_as(keep)
    picked = hidden[rows[keep], batch.positions.to(device)[keep]]  # [N, H]
    values = token_logprobs(picked, head.weight, batch.completion_ids.to(device)[keep], head.bias,
                            temperature, chunk_size)
    out = torch.zeros(keep.shape, dtype=torch.float32, device=device)
    out[keep] = values
    return out


def cp_completion_logprobs(model: Any, batch: TrainBatch, group: Any, temperature: float = 1.0,
                           chunk_size: int = 1024) -> torch.Tensor:
    """``[B, Tc]`` like :func:`completion_logprobs`, each rank of the cp ``group`` running its share of every row.

    Every rank returns the whole rows' values (the other ranks' gathered, detached), but the gradient
    flows only through this rank's own tokens: each rank runs the same policy loss on whole rows
    (sequence means and per-sequence mismatch need them), and the gradients summed over the group
    are those of one process (``training/context_parallel.py``).
    """
    return in_root(model, _cp_completion_logprobs, model, batch, group, temperature, chunk_size)


def _cp_completion_logprobs(model: Any, batch: TrainBatch, group: Any, temperature: float,
                            chunk_size: int) -> torch.Tensor:
    from posttrain.training import context_parallel as cp

    device = trunk_and_head(model)[1].weight.device
    ids, positions = batch.input_ids.to(device), batch.positions.to(device)  # [B, T], [B, Tc]
    keep = batch.mask.to(device) > 0  # [B, Tc]
    rows = torch.arange(len(batch), device=device)[:, None].expand_as(keep)
    labels = torch.full_like(ids, IGNORE_INDEX)  # only the completion tokens that train get a target
    labels[rows[keep], positions[keep] + 1] = batch.completion_ids.to(device)[keep]
    local, _, shard = cp.cp_token_logprobs(model, {"input_ids": ids, "labels": labels,
                                                   "attention_mask": batch.attention_mask.to(device)},
                                           group, temperature=temperature, chunk_size=chunk_size)  # [B, t]
    full = cp.gather_sequence(local, shard, ids.shape[1])  # [B, T] row order, no grad
    own = torch.zeros((len(batch), shard.doc.shape[1]), dtype=local.dtype, device=device)
    own = own.index_copy(1, shard.index.to(device), local - local.detach())  # zeros that carry local's grad
    return (full + own[:, : ids.shape[1]]).gather(1, positions) * keep  # [B, Tc]
