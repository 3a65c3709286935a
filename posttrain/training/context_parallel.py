"""Context parallelism: one long (packed) sequence split over the ranks of a cp process group.

How a batch ``[B, T]`` becomes ``N`` shards (Llama 3 style, all-gather of K/V):

1. Labels are shifted to next-token targets on the *whole* row first, so the last token of a
   rank's chunk still predicts the first token of the next chunk, wherever that lives.
2. The row is padded to a multiple of ``2N`` and cut into ``2N`` chunks; rank ``r`` keeps chunks
   ``r`` and ``2N-1-r``. Causal attention costs more late in the row, so pairing an early chunk
   with a late one gives every rank the same work.
3. Each token keeps its *global* RoPE position (restarting per packed document, as the packer
   wrote it) and its global document id.
4. In every attention layer the ``posttrain_cp`` implementation all-gathers K/V over the group
   (backward: reduce-scatter of their gradients, written with ``all_to_all_single`` since gloo
   has no ``reduce_scatter``) and attends the local queries to their documents' past: exact
   causal attention. On CPU a segment at a time on the fused flash kernel, unmasked prefix and
   causal diagonal merged by log-sum-exp (``cp_segments``: no mask, no recompute); elsewhere (and
   for dropout or a document split by padding) SDPA a query block at a time against the keys
   from their documents' start to the block's end, masked to "same document and not later in the
   row" from the global indices, each block recomputed in backward, so no ``[t, T]`` mask or
   score matrix outlives its block.
5. Each rank sums the NLL of its own targets; the token count is all-reduced over the group, so
   ``nll / count`` summed over ranks is the CP=1 token mean and the parameter gradients, summed
   over the group (or reduce-scattered by FSDP over ``dp_shard x cp``), equal the CP=1 ones.

Only attention mixes tokens in a Llama/Qwen2 block, so nothing else needs to know. NemotronH's
Mamba2 mixers read the same ``cp_shard`` (``mamba_packing.cp_mixer_forward``: each chunk starts
from the state the row before it leaves); other layers that carry a state along the row are
refused by name (:func:`check_supported`).

Wiring into a loop (``par`` from ``training.parallel``): the ranks of one cp group take the
*same* micro-batches (``step[par.dp_rank::par.dp_size]``) and each calls
``in_root(model, cp_nll_sum, model, batch, par.cp_group(), chunk)`` where it called
``causal_lm_nll_sum``; ``(nll / step_loss_tokens).backward()`` and the gradient and metric sums
over all ranks stay as they are (cp ranks hold disjoint tokens). The RL passes use
:func:`cp_token_logprobs`, ``shard.take`` and :func:`gather_sequence`.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from posttrain.errors import ConfigError
from posttrain.training.cp_segments import PAD_DOC, Segment, SegmentAttention, plan
from posttrain.training.loss import IGNORE_INDEX, shifted_targets, token_logprobs, trunk_and_head

# Default query block: its [block, keys] mask stays under MASK_BUDGET elements whatever the row
# length, so per-rank memory shrinks with the cp size instead of growing with the row.
MASK_BUDGET = 2**24
MIN_QUERY_BLOCK = 64
CP_ATTENTION = "posttrain_cp"  # config._attn_implementation of a model running under CP
# Layer kinds that carry a recurrent state or a causal convolution along the row: a rank needs
# the previous rank's final state, passed on only for NemotronH's Mamba2 mixers (mamba_packing).
STATEFUL = re.compile(r"Mamba|SSM|Ssm|DeltaNet|Rwkv|RWKV|LinearAttention|ShortConv")


# --------------------------------------------------------------------------- splitting


def group_size_rank(group: Any) -> tuple[int, int]:
    """(size, rank) of this process in the cp ``group``; (1, 0) for None (one process)."""
    if group is None:
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def padded_length(length: int, size: int) -> int:
    """The row length after padding to a multiple of ``2 * size`` chunks."""
    return -(-length // (2 * size)) * (2 * size)


def load_balanced_indices(length: int, size: int, rank: int) -> torch.Tensor:
    """Global token indices ``[length // size]`` of ``rank``: chunks ``rank`` and ``2*size-1-rank`` of ``2*size``."""
    if length % (2 * size):
        raise ValueError(f"length {length} is not a multiple of 2 x cp size ({2 * size}); pad it first")
    if not 0 <= rank < size:
        raise ValueError(f"rank {rank} outside the cp group of {size}")
    chunk = length // (2 * size)
    first, second = rank * chunk, (2 * size - 1 - rank) * chunk
    return torch.cat([torch.arange(first, first + chunk), torch.arange(second, second + chunk)])


def _document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` bool: a document starts here (the position does not step by 1 from its left neighbour)."""
    step = position_ids[:, 1:] - position_ids[:, :-1]  # [B, T-1]
    return torch.cat([torch.ones_like(position_ids[:, :1], dtype=torch.bool), step != 1], dim=1)


def document_ids(position_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, T]`` document id of every token: a new document wherever the position does not step by 1.

    The same rule transformers uses to find packed documents (``find_packed_sequence_indices``);
    tokens with ``attention_mask == 0`` get :data:`PAD_DOC`.
    """
    docs = _document_starts(position_ids).long().cumsum(dim=1) - 1  # [B, T], 0-based per row
    if attention_mask is not None:
        docs = docs.masked_fill(attention_mask == 0, PAD_DOC)
    return docs


@dataclass(frozen=True)
class CPShard:
    """What the ``posttrain_cp`` attention needs to know about this rank's share of the batch.

    ``index: [t]`` global positions (in the padded row) of the local tokens: two runs of
    ``chunk`` consecutive positions; ``gather_index: [N*t]`` global positions of the keys in the
    order the all-gather returns them; ``doc: [B, T]`` document id and ``doc_start: [B, T]``
    first position of the document of every token of the row. The queries go to SDPA in blocks
    of at most ``query_block`` consecutive positions, each against only the keys from its
    documents' start to its last query, so mask and scores stay ``[B, H, block, <= T]``.
    """

    group: Any
    index: torch.Tensor
    gather_index: torch.Tensor
    doc: torch.Tensor
    doc_start: torch.Tensor
    chunk: int
    query_block: int

    def take(self, x: torch.Tensor, fill: float = 0, shifted: bool = False) -> torch.Tensor:
        """This rank's part ``[B, t, ...]`` of a row-coordinate tensor ``x: [B, T, ...]`` (padded with ``fill``).

        ``shifted=True`` for values aligned to the token they score (advantages, rollout
        logprobs): local position ``j`` then gets ``x[:, index[j] + 1]``, like the targets.
        """
        if shifted:
            x = torch.cat([x[:, 1:], torch.full_like(x[:, :1], fill)], dim=1)
        extra = self.doc.shape[1] - x.shape[1]
        if extra:
            x = torch.cat([x, torch.full((x.shape[0], extra, *x.shape[2:]), fill, dtype=x.dtype, device=x.device)], 1)
        return x[:, self.index.to(x.device)]

    @functools.cached_property
    def segments(self) -> list[Segment] | None:
        """The local queries cut at document and chunk edges, for the fused CPU path
        (``cp_segments``); None when a row has a document split by padding."""
        return plan(self.doc, self.doc_start, (int(self.index[0]), int(self.index[self.chunk])), self.chunk)

    @functools.cached_property
    def blocks(self) -> list[tuple[int, int, int, int]]:
        """``(local start, local stop, first key, key stop)`` per query block; keys in row order.

        Computed once per batch (not per layer): the only host reads of the shard's tensors."""
        out = []
        for first in (0, self.chunk):
            for start in range(first, first + self.chunk, self.query_block):
                stop = min(start + self.query_block, first + self.chunk)
                g0 = int(self.index[start])
                out.append((start, stop, int(self.doc_start[:, g0].min()), g0 + stop - start))
        return out

    def mask(self, start: int, stop: int, k0: int, k1: int) -> torch.Tensor:
        """``[B, 1, q, k]`` bool, local queries ``start:stop`` x global keys ``k0:k1``: same document, not later."""
        g0 = int(self.index[start])
        q_pos = torch.arange(g0, g0 + stop - start, device=self.doc.device)
        k_pos = torch.arange(k0, k1, device=self.doc.device)
        same_doc = self.doc[:, g0 : g0 + stop - start, None] == self.doc[:, None, k0:k1]  # [B, q, k]
        return (same_doc & (k_pos[None, :] <= q_pos[:, None])[None])[:, None]


def shard_batch(batch: dict[str, torch.Tensor], size: int, rank: int, *, pad_id: int = 0,
                group: Any = None, query_block: int | None = None) -> tuple[dict[str, torch.Tensor], CPShard]:
    """This rank's share of ``batch`` (``input_ids``/``labels`` and ``position_ids`` or ``attention_mask``, ``[B, T]``).

    Returns ``input_ids``, ``position_ids`` (global, restarting per document) and ``targets``
    (already shifted: do not shift again), each ``[B, T_pad / size]``, and the :class:`CPShard`.
    """
    if query_block is not None and query_block < 1:
        raise ValueError(f"query_block must be >= 1 (got {query_block})")
    ids, labels = batch["input_ids"], batch["labels"]
    mask = batch.get("attention_mask")
    positions = batch.get("position_ids")
    if positions is None:  # one document per row, positions as transformers makes them (CP=1 == CP=N)
        positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    if mask is None:
        mask = torch.ones_like(ids)
    targets = shifted_targets(labels).masked_fill(mask == 0, IGNORE_INDEX)  # [B, T], before the split
    length = ids.shape[1]
    extra = padded_length(length, size) - length
    if extra:  # the tail: padding, no targets; causal order keeps real queries off it
        ids = F.pad(ids, (0, extra), value=pad_id)
        targets = F.pad(targets, (0, extra), value=IGNORE_INDEX)
        positions = torch.cat([positions, torch.arange(extra, device=ids.device).expand(ids.shape[0], -1)], 1)
        mask = F.pad(mask, (0, extra), value=0)
    docs = document_ids(positions, mask)  # [B, T_pad]
    where = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    doc_start = torch.where(_document_starts(positions), where, 0).cummax(dim=1).values  # [B, T_pad]
    index = load_balanced_indices(ids.shape[1], size, rank).to(ids.device)  # [t]
    gather_index = torch.cat([load_balanced_indices(ids.shape[1], size, r) for r in range(size)]).to(ids.device)
    local = {"input_ids": ids[:, index], "position_ids": positions[:, index], "targets": targets[:, index]}
    shard = CPShard(group=group, index=index, gather_index=gather_index, doc=docs, doc_start=doc_start,
                    chunk=ids.shape[1] // (2 * size),
                    query_block=query_block or max(MIN_QUERY_BLOCK, MASK_BUDGET // ids.shape[1]))
    return local, shard


def gather_sequence(local: torch.Tensor, shard: CPShard, length: int) -> torch.Tensor:
    """``[B, t, ...]`` per-rank values (e.g. token logprobs) -> ``[B, length, ...]`` in row order, on every rank.

    No gradient flows back; for logprob passes and metrics. ``length`` is the unpadded row length.
    """
    wire = local.detach().to(torch.uint8) if local.dtype == torch.bool else local.detach()  # gloo: no bool
    full = _gather_seq_dim(wire.contiguous(), 1, shard.group)  # [B, N*t, ...] in gather order
    out = torch.empty_like(full)
    out[:, shard.gather_index.to(out.device)] = full
    return out[:, :length].to(local.dtype)


# --------------------------------------------------------------------------- the K/V exchange


def _gather_seq_dim(x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
    size, _ = group_size_rank(group)
    if size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=dim)


def _owner(chunk: int, size: int) -> tuple[int, int]:
    """(rank, which of its two chunks) holding row chunk ``chunk`` of ``2 * size``."""
    return (chunk, 0) if chunk < size else (2 * size - 1 - chunk, 1)


class _AllGatherRow(torch.autograd.Function):
    """All-gather of the ranks' load-balanced shards along ``dim``, returned in row order.

    Backward is a reduce-scatter: every rank's queries read every rank's keys, so the gradient of
    this rank's K/V is the sum of what all ranks send back for its two chunks. An
    ``all_to_all_single`` hands rank ``j`` its chunks and ``j`` adds what it receives (the traffic
    of a reduce-scatter; gloo has no reduce_scatter).
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dim: int, group: Any) -> torch.Tensor:
        ctx.dim, ctx.group = dim, group
        size, _ = group_size_rank(group)
        if size == 1:  # chunks 0 and 1: already row order
            return x
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        halves = [p.chunk(2, dim) for p in parts]
        return torch.cat([halves[r][h] for r, h in (_owner(c, size) for c in range(2 * size))], dim)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        size, _ = group_size_rank(ctx.group)
        if size == 1:
            return grad, None, None
        chunks = grad.chunk(2 * size, ctx.dim)  # row order
        send = torch.cat([chunks[c].movedim(ctx.dim, 0) for r in range(size) for c in (r, 2 * size - 1 - r)])
        recv = torch.empty_like(send)  # [N*t, ...]: slice j goes to rank j
        dist.all_to_all_single(recv, send, group=ctx.group)
        summed = recv.view(size, send.shape[0] // size, *send.shape[1:]).sum(0)  # [t, ...]
        return summed.movedim(0, ctx.dim), None, None


def all_gather_kv(key: torch.Tensor, value: torch.Tensor, group: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, Hkv, t, D]`` local K and V -> ``[B, Hkv, T, D]`` each in row order, one collective for both."""
    both = _AllGatherRow.apply(torch.stack([key, value]), 3, group)  # [2, B, Hkv, T, D]
    return both[0], both[1]


def _attend_block(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, shard: CPShard,
                  block: tuple[int, int, int, int], dropout: float, scaling: float | None) -> torch.Tensor:
    start, stop, k0, k1 = block
    return F.scaled_dot_product_attention(query[:, :, start:stop], key[:, :, k0:k1], value[:, :, k0:k1],
                                          attn_mask=shard.mask(start, stop, k0, k1), dropout_p=dropout,
                                          scale=scaling, enable_gqa=True)  # [B, H, q, D]


def cp_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                 cp_shard: CPShard | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    """The ``posttrain_cp`` attention: local ``query: [B, H, t, D]`` against K/V gathered over the cp group.

    Returns ``[B, t, H, D]`` like transformers' SDPA path. With a ``cp_shard`` the mask comes from
    the shard's global positions and documents (``attention_mask`` is a stand-in); each query
    block is recomputed in backward, so its ``[block, keys]`` mask is never kept. Without one it
    is transformers' SDPA, unchanged.
    """
    if cp_shard is None:  # not a CP pass (evaluation, generation): exactly transformers' SDPA
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    key, value = all_gather_kv(key, value, cp_shard.group)  # [B, Hkv, T, D] in row order
    if query.device.type == "cpu" and not dropout and cp_shard.segments is not None:
        out = SegmentAttention.apply(query, key, value, cp_shard.segments, scaling)  # [B, H, t, D]
        return out.transpose(1, 2).contiguous(), None
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    outs = []
    for block in cp_shard.blocks:
        if grad:
            outs.append(checkpoint(_attend_block, query, key, value, cp_shard, block, dropout, scaling,
                                   use_reentrant=False))
        else:
            outs.append(_attend_block(query, key, value, cp_shard, block, dropout, scaling))
    return torch.cat(outs, dim=2).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(CP_ATTENTION, cp_attention)
    AttentionMaskInterface.register(CP_ATTENTION, sdpa_mask)  # the mask of non-CP passes


_register()


# --------------------------------------------------------------------------- model and loss


def _unsupported_stateful(model: Any) -> list[str]:
    """Class names of layers that carry state along the row and have no CP forward here."""
    from posttrain.training import mamba_packing

    carried = [m for m in model.modules() if mamba_packing.supports(m)]  # NemotronH Mamba2: state passed on
    inside = {id(sub) for m in carried for sub in m.modules()}
    return sorted({type(m).__name__ for m in model.modules()
                   if STATEFUL.search(type(m).__name__) and id(m) not in inside})


def check_supported(model: Any) -> None:
    """Raise ConfigError when ``model`` has layers CP cannot split exactly.

    NemotronH's Mamba2 mixers are supported (``mamba_packing.cp_mixer_forward`` starts each
    chunk from the state the row before it leaves); other recurrent layers are refused by name.
    """
    stateful = _unsupported_stateful(model)
    if stateful:
        raise ConfigError(
            f"train.context_parallel > 1 is not supported for {type(model).__name__}: its "
            f"{', '.join(stateful)} layers carry a state along the sequence, and each rank would have to "
            "start from the previous rank's final state (and send its gradient back), which is built only "
            "for NemotronH's Mamba2 mixers. Use train.context_parallel=1 for this model.")


def enable_context_parallel(model: Any) -> Any:
    """Switch ``model``'s attention to ``posttrain_cp`` (once, at set-up, like FSDP wrapping); returns it.

    The switch stays: gradient checkpointing re-runs layers during backward, after any ``with``
    block would have ended. Without a ``cp_shard`` the implementation is plain SDPA with the mask
    transformers builds, so evaluation and generation on the same model are unchanged.
    """
    from posttrain.training import mamba_packing

    check_supported(model)
    mamba_packing.enable_exact_packing(model)  # Mamba2 mixers read cp_shard (a no-op for other models)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.config._attn_implementation != CP_ATTENTION:
        base.set_attn_implementation(CP_ATTENTION)
    return model


def cp_forward(model: Any, batch: dict[str, torch.Tensor], group: Any, *, pad_id: int = 0,
               query_block: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor], CPShard]:
    """Decoder trunk on this rank's share of ``batch``: (hidden ``[B, t, H]``, local batch, shard)."""
    enable_context_parallel(model)
    size, rank = group_size_rank(group)
    local, shard = shard_batch(batch, size, rank, pad_id=pad_id, group=group, query_block=query_block)
    trunk, _ = trunk_and_head(model)
    # The 4D stand-in mask stops transformers from building a dense [t, t] mask for the local rows;
    # cp_attention builds its own, a query block at a time, from the shard's global indices.
    stand_in = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=local["input_ids"].device)
    hidden = trunk(input_ids=local["input_ids"], position_ids=local["position_ids"], attention_mask=stand_in,
                   use_cache=False, cp_shard=shard).last_hidden_state
    return hidden, local, shard


def cp_token_logprobs(model: Any, batch: dict[str, torch.Tensor], group: Any, *, temperature: float = 1.0,
                      chunk_size: int = 2048, pad_id: int = 0,
                      query_block: int | None = None) -> tuple[torch.Tensor, torch.Tensor, CPShard]:
    """(``[B, t]`` log p(target) of this rank's targets (0 where none), ``[B, t]`` bool: has a target, shard).

    Local position ``j`` predicts the row token at ``shard.index[j] + 1``. For the RL trainer's
    passes: per-token tensors in row coordinates (advantages, old and rollout logprobs, aligned to
    the token they score) come to this rank with ``shard.take(x, shifted=True)``; full rows come
    back with :func:`gather_sequence`.
    """
    _, head = trunk_and_head(model)
    hidden, local, shard = cp_forward(model, batch, group, pad_id=pad_id, query_block=query_block)
    targets = local["targets"]  # [B, t], shifted before the split
    keep = targets != IGNORE_INDEX  # [B, t]
    values = token_logprobs(hidden[keep], head.weight, targets[keep], head.bias, temperature, chunk_size)
    out = torch.zeros(keep.shape, dtype=torch.float32, device=hidden.device)
    out[keep] = values
    if hidden.requires_grad and not values.numel():
        # no target on this rank (e.g. all labels in the other ranks' chunks): its backward must still run
        # through the trunk, whose K/V exchanges (and FSDP reduce-scatters) the other ranks wait on
        out = out + 0.0 * hidden.sum()
    return out, keep, shard


def cp_nll_sum(model: Any, batch: dict[str, torch.Tensor], group: Any, chunk_size: int = 2048,
               pad_id: int = 0, query_block: int | None = None) -> tuple[torch.Tensor, int]:
    """(NLL sum over *this rank's* labelled tokens, labelled tokens of the *whole* batch).

    The CP counterpart of ``training.loss.causal_lm_nll_sum``, called by every rank of the cp
    group with the same ``batch``. Backward ``nll / global_tokens`` on each rank, then sum the
    parameter gradients over the group (with the data-parallel sum, or FSDP's reduce-scatter over
    ``dp_shard x cp``): loss and gradients equal one process running the whole batch.
    """
    logprobs, keep, _ = cp_token_logprobs(model, batch, group, chunk_size=chunk_size, pad_id=pad_id,
                                          query_block=query_block)
    count = keep.sum().reshape(1)
    if group is not None:
        dist.all_reduce(count, group=group)
    return -logprobs.sum(), int(count)
