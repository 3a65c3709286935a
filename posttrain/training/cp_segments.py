"""Exact attention of one CP rank's queries, a document segment at a time, on the fused CPU kernel.

The general path (``context_parallel._attend_block``) runs SDPA per query block with a
``[block, keys]`` bool mask. On CPU the flash kernel turns that mask into a float tensor of the
same shape (5 bytes per element in all), a cost per block that does not shrink with the CP size,
and each block runs three times (forward, checkpoint recompute, backward) with a full-size
gradient of Q, K and V per block. At 64K tokens that fixed cost was most of a small model's
per-rank activation memory, which is why CP=2 used 0.70x of CP=1's instead of about half.

Here the local queries are cut where their document or their chunk changes. A segment of
queries ``[g0, g1)`` of a document that starts at ``s`` attends to keys ``[s, g0)`` without a
mask and to ``[g0, g1)`` with the kernel's own causal mask (square, so its top-left alignment is
the right one); the two partial results are merged by their log-sum-exp, as flash attention
merges tiles and ring attention merges ranks. Backward calls the kernel's backward on each part
with the *merged* output and log-sum-exp, which is exact, and adds the parts' gradients into
this rank's dQ and the row's dK/dV in place: no mask, no recompute, no per-block full-size
gradient. It needs every real document to be one contiguous run of its row (padding between
two pieces of one document is left to the masked path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

PAD_DOC = -1  # document id of padding (attention_mask 0, or the tail CP adds to fill 2N chunks)
_FORWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_BACKWARD = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


@dataclass(frozen=True)
class Segment:
    """Local queries ``start:stop`` of batch row ``row``: keys ``[first_key, g0)`` unmasked, then
    ``[g0, g0 + stop - start)`` causal (``g0`` is the global position of query ``start``)."""

    row: int
    start: int
    stop: int
    first_key: int
    g0: int

    def parts(self) -> list[tuple[int, int, bool]]:
        """``(key start, key stop, causal)`` of the kernel calls this segment needs."""
        diagonal = (self.g0, self.g0 + self.stop - self.start, True)
        return [(self.first_key, self.g0, False), diagonal] if self.first_key < self.g0 else [diagonal]


def plan(doc: torch.Tensor, doc_start: torch.Tensor, chunk_starts: tuple[int, int], chunk: int) -> list[Segment] | None:
    """Segments of a rank's two chunks (global starts ``chunk_starts``, ``chunk`` tokens each), or
    None when a row has a document split by padding (then the caller keeps the masked path).

    ``doc: [B, T]`` document ids (:data:`PAD_DOC` for padding), ``doc_start: [B, T]`` first
    position of each token's document as the positions give it; a run is a maximal stretch where
    both stay the same."""
    change = (doc[:, 1:] != doc[:, :-1]) | (doc_start[:, 1:] != doc_start[:, :-1])  # [B, T-1]
    out = []
    for row in range(doc.shape[0]):
        starts = [0, *(torch.nonzero(change[row])[:, 0] + 1).tolist()]
        real = [d for d in doc[row, starts].tolist() if d != PAD_DOC]
        if len(real) != len(set(real)):
            return None
        bounds = list(zip(starts, [*starts[1:], doc.shape[1]]))
        for which, first in enumerate(chunk_starts):
            for run_start, run_stop in bounds:
                lo, hi = max(run_start, first), min(run_stop, first + chunk)
                if lo < hi:
                    local = which * chunk + lo - first
                    out.append(Segment(row, local, local + hi - lo, run_start, lo))
    return out


class SegmentAttention(torch.autograd.Function):
    """``query: [B, H, t, D]`` (local) x ``key``/``value: [B, Hkv, T, D]`` (the whole row) -> ``[B, H, t, D]``."""

    @staticmethod
    def forward(ctx: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                segments: list[Segment], scale: float | None) -> torch.Tensor:
        out = torch.empty_like(query)
        lse = query.new_empty(query.shape[:3], dtype=torch.float32)  # [B, H, t]
        for seg in segments:
            row, cols = slice(seg.row, seg.row + 1), slice(seg.start, seg.stop)
            merged = merged_lse = None
            for k0, k1, causal in seg.parts():
                o, part_lse = _FORWARD(query[row, :, cols], key[row, :, k0:k1], value[row, :, k0:k1], 0.0, causal,
                                       scale=scale)  # [1, H, q, D], [1, H, q]
                if merged is None:
                    merged, merged_lse = o.float(), part_lse.float()
                    continue
                both = torch.logaddexp(merged_lse, part_lse)
                merged = (merged * (merged_lse - both).exp()[..., None]
                          + o.float() * (part_lse - both).exp()[..., None])
                merged_lse = both
            out[row, :, cols] = merged
            lse[row, :, cols] = merged_lse
        ctx.save_for_backward(query, key, value, out, lse)
        ctx.segments, ctx.scale = segments, scale
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None, None]:
        query, key, value, out, lse = ctx.saved_tensors
        grad = grad.contiguous()
        dq, dk, dv = torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
        for seg in ctx.segments:
            row, cols = slice(seg.row, seg.row + 1), slice(seg.start, seg.stop)
            for k0, k1, causal in seg.parts():
                gq, gk, gv = _BACKWARD(grad[row, :, cols], query[row, :, cols], key[row, :, k0:k1],
                                       value[row, :, k0:k1], out[row, :, cols], lse[row, :, cols], 0.0, causal,
                                       scale=ctx.scale)
                dq[row, :, cols] += gq
                dk[row, :, k0:k1] += gk
                dv[row, :, k0:k1] += gv
        return dq, dk, dv, None, None
