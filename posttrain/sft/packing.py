"""Micro-batch planning and collation: exact packing or exact padding.

``pack``: documents are concatenated into one row; ``position_ids`` restart at 0 for each
document, which transformers turns into a block-diagonal causal mask (SDPA/eager) or varlen
attention (flash-attention), so no token attends across documents. Each document's first token
gets no label, so the previous document never learns to predict it.

NemotronH's Mamba2 layers would carry conv/SSM state across documents in transformers' code;
when packing, ``resolve_packing`` installs ``training.mamba_packing``, which resets that state
at each document start (``seq_idx`` from the restarting position ids), so they pack exactly too.

``pad``: one document per row, right-padded; exact for every architecture, including recurrent
layers with no ``seq_idx`` support here (they make ``auto`` pad). The plan is a pure function of
(lengths, seed, epoch): every data-parallel process builds the same plan and takes its share,
and resume skips to a step without any data state.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any, Literal

import torch

from posttrain.errors import ConfigError, DataError
from posttrain.training import mamba_packing
from posttrain.training.loss import IGNORE_INDEX

log = logging.getLogger(__name__)

Mode = Literal["pack", "pad"]
MicroBatch = list[int]  # sample indices
Step = list[MicroBatch]


def group_micro_batches(lengths: Sequence[int], order: Sequence[int], max_tokens: int, mode: Mode) -> list[MicroBatch]:
    """Fill micro-batches in ``order``: pack = total length <= max_tokens; pad = rows x longest <= max_tokens."""
    batches: list[MicroBatch] = []
    current: MicroBatch = []
    longest = total = 0
    for idx in order:
        n = lengths[idx]
        if n > max_tokens:
            raise ValueError(f"sample {idx} has {n} tokens > micro-batch size {max_tokens}")
        fits = (total + n <= max_tokens) if mode == "pack" else ((len(current) + 1) * max(longest, n) <= max_tokens)
        if current and not fits:
            batches.append(current)
            current, longest, total = [], 0, 0
        current.append(idx)
        longest, total = max(longest, n), total + n
    if current:
        batches.append(current)
    return batches


def plan_steps(lengths: Sequence[int], *, max_tokens: int, micro_batches_per_step: int, epochs: int,
               seed: int, mode: Mode, max_steps: int | None = None) -> list[Step]:
    """All optimizer steps of a run: each a list of ``micro_batches_per_step`` micro-batches.

    Samples are shuffled per epoch (``seed + epoch``); a trailing group smaller than a full step
    is dropped so every step has the same shape (and splits evenly over processes).
    """
    steps: list[Step] = []
    for epoch in range(epochs):
        g = torch.Generator().manual_seed(seed * 1000003 + epoch)
        order = torch.randperm(len(lengths), generator=g).tolist()
        micro = group_micro_batches(lengths, order, max_tokens, mode)
        full = len(micro) // micro_batches_per_step * micro_batches_per_step
        steps.extend(micro[i : i + micro_batches_per_step] for i in range(0, full, micro_batches_per_step))
    if not steps:
        raise DataError(f"not enough data for one step of {micro_batches_per_step} micro-batches of "
                        f"{max_tokens} tokens; lower train.micro_batches_per_step or micro_batch_tokens")
    return steps[:max_steps] if max_steps else steps


def _labels(ids: list[int], mask: list[int]) -> list[int]:
    return [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]


def collate_packed(docs: Sequence[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """``[(ids, loss_mask), ...]`` -> one packed row: input_ids / labels / position_ids ``[1, T]``."""
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    for doc_ids, mask in docs:
        doc_labels = _labels(doc_ids, mask)
        doc_labels[0] = IGNORE_INDEX  # never predicted from the previous document
        ids += doc_ids
        labels += doc_labels
        pos += range(len(doc_ids))
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([pos])}


def collate_padded(docs: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """One document per row, right-padded: input_ids / labels / attention_mask ``[B, L]``."""
    longest = max(len(ids) for ids, _ in docs)
    ids = torch.full((len(docs), longest), pad_id, dtype=torch.long)
    labels = torch.full((len(docs), longest), IGNORE_INDEX, dtype=torch.long)
    attn = torch.zeros((len(docs), longest), dtype=torch.long)
    for row, (doc_ids, mask) in enumerate(docs):
        n = len(doc_ids)
        ids[row, :n] = torch.tensor(doc_ids)
        labels[row, :n] = torch.tensor(_labels(doc_ids, mask))
        attn[row, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": attn}


def collate(docs: Sequence[tuple[list[int], list[int]]], mode: Mode, pad_id: int) -> dict[str, torch.Tensor]:
    return collate_packed(docs) if mode == "pack" else collate_padded(docs, pad_id)


# --------------------------------------------------------------------------- exactness

# Layer kinds whose transformers implementation runs a recurrent state or a causal convolution
# along the row: position ids do not reset them, so packed documents would leak into each other,
# unless ``mamba_packing`` can reset them per document (NemotronH's Mamba2 mixer).
STATEFUL = re.compile(r"Mamba|SSM|Ssm|DeltaNet|Rwkv|RWKV|LinearAttention|ShortConv")
PACKING_ATTENTION = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")


def packing_blocker(model: Any) -> str | None:
    """Why packing would not be exact for ``model`` (None when it is, with ``mamba_packing`` installed)."""
    stateful = sorted({type(m).__name__ for m in model.modules()
                       if STATEFUL.search(type(m).__name__) and not mamba_packing.supports(m)})
    if stateful:
        return (f"{', '.join(stateful)} carry state along the row and ignore document boundaries "
                "(no seq_idx support for them here)")
    attn = getattr(model.config, "_attn_implementation", None)
    if attn not in PACKING_ATTENTION:
        return f"attention implementation {attn!r} does not isolate packed documents"
    return None


def resolve_packing(requested: str, model: Any) -> Mode:
    """``auto`` -> pack when exact else pad; ``pack`` on a model where it is not exact is an error.

    Packing a model with Mamba2 layers installs :func:`mamba_packing.enable_exact_packing` on it.
    """
    blocker = packing_blocker(model)
    if requested == "pad":
        return "pad"
    if blocker is None:
        mamba_packing.enable_exact_packing(model)
        return "pack"
    if requested == "pack":
        raise ConfigError(f"train.packing=pack is not exact for {type(model).__name__}: {blocker}. "
                          "Use train.packing=auto or pad (one document per row, exact).")
    log.warning("packing off for %s: %s; using exact padding (one document per row)", type(model).__name__, blocker)
    return "pad"
