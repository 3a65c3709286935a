"""Exact packing for NemotronH's Mamba2 layers: conv and SSM state restart at every document.

Packed rows (``sft/packing.py``) mark documents by restarting ``position_ids`` at 0. Attention
layers turn that into a block-diagonal mask, but transformers' Mamba2 mixer runs its causal
conv1d and its chunked SSD scan straight along the row, so state leaks from one document into
the next (logits off by ~0.5 on tiny-nemotron-h). Here each row gets ``seq_idx: [B, T]`` (the
document number of every token) and the mixer honours it:

- conv1d: output ``t`` sums taps ``x[t - s]`` only where ``seq_idx[t - s] == seq_idx[t]``;
- SSD scan: every decay that crosses a document start is 0 (``exp(-inf)``): in the intra-chunk
  ``L`` matrix, in the chunk-final states, in the inter-chunk carry and in the carry's read-out.

So one packed row computes exactly what its documents compute alone (within float rounding).
On CUDA with ``mamba_ssm`` and ``causal_conv1d`` installed, ``seq_idx`` goes to their fused
kernels instead, which implement the same reset.

Install with :func:`enable_exact_packing` (``sft.packing.resolve_packing`` does it when it packs):
a pre-hook on the NemotronH trunk derives ``seq_idx`` from ``position_ids``; each Mamba2 mixer's
``forward`` becomes :func:`mixer_forward`, which defers to transformers' own forward whenever no
``seq_idx`` is given (generation, one document per row).

Context parallelism (:func:`cp_mixer_forward`, used when the trunk gets a ``cp_shard`` from
``training.context_parallel``): each rank's chunks of the row start from the conv inputs and the
SSM state the row before them leaves; the chunk states are all-gathered (backward: their
gradients summed back to their owners), so CP=N equals CP=1. The conv and scan take that
initial state (``initial_states``) and the scan returns its final one.
"""

from __future__ import annotations

import functools
import logging
import math
import types
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

_MARK = "_posttrain_exact_packing"


# --------------------------------------------------------------------------- documents


def seq_idx_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """``position_ids: [B, T]`` -> ``seq_idx: [B, T]`` int32, +1 wherever positions do not go on by one.

    ``[[0, 1, 2, 0, 1]] -> [[0, 0, 0, 1, 1]]``. A row starting at ``p > 0`` (a cached prefix) is
    one document.
    """
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [B, T] (got shape {tuple(position_ids.shape)})")
    starts = torch.zeros_like(position_ids, dtype=torch.int32)
    starts[:, 1:] = (position_ids[:, 1:] != position_ids[:, :-1] + 1).to(torch.int32)
    return starts.cumsum(-1, dtype=torch.int32)


def seq_idx_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int | None = None) -> torch.Tensor:
    """Flash-attention's ``cu_seqlens: [D + 1]`` (``[0, n0, n0 + n1, ...]``) -> ``seq_idx: [1, T]`` int32."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    total = int(cu_seqlens[-1]) if total is None else total
    ids = torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device, dtype=torch.int32), lengths)
    if ids.numel() != total:
        raise ValueError(f"cu_seqlens covers {ids.numel()} tokens but the row has {total}")
    return ids[None]


# --------------------------------------------------------------------------- pure-torch ops


def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  activation: str | None = None, seq_idx: torch.Tensor | None = None,
                  initial_states: torch.Tensor | None = None,
                  initial_seq_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Depthwise causal conv ``x: [B, C, T]``, ``weight: [C, K]`` -> ``[B, C, T]``, per document.

    ``initial_states: [B, C, K-1]`` are the inputs before ``x`` (zeros when None); they belong to
    the row's first document, or to ``initial_seq_idx: [B, K-1]``. Tap ``j`` reads
    ``x[t - (K-1-j)]``, as ``F.conv1d`` with ``K-1`` left padding does, and is dropped where that
    token lies in another document.
    """
    b, c, t = x.shape
    k = weight.shape[-1]
    x = x.to(weight.dtype)
    prefix = x.new_zeros(b, c, k - 1) if initial_states is None else initial_states.to(x.dtype)
    xp = torch.cat([prefix, x], dim=-1)  # [B, C, K-1+T]
    if seq_idx is None:
        out = F.conv1d(xp, weight[:, None], bias, groups=c)
    else:
        before = seq_idx[:, :1].expand(b, k - 1) if initial_seq_idx is None else initial_seq_idx.to(seq_idx)
        sp = torch.cat([before, seq_idx], dim=-1)  # [B, K-1+T]
        out = sum(weight[:, j, None] * xp[..., j : j + t] * (sp[:, None, j : j + t] == seq_idx[:, None])
                  for j in range(k))
        if bias is not None:
            out = out + bias[:, None]
    if activation is not None:
        out = {"silu": F.silu, "swish": F.silu}[activation](out)
    return out


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """``x: [..., L]`` -> ``[..., L, L]``: ``out[i, j] = x[j+1] + ... + x[i]`` for ``j <= i``, -inf above."""
    n = x.size(-1)
    x = x[..., None].expand(*x.shape, n)
    x = x.masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool, device=x.device), diagonal=-1), 0)
    out = torch.cumsum(x, dim=-2)
    return out.masked_fill(~torch.tril(torch.ones(n, n, dtype=torch.bool, device=x.device), diagonal=0), -math.inf)


def _chunks(x: torch.Tensor, pad: int, size: int) -> torch.Tensor:
    """``[B, T, ...]`` -> zero-padded ``[B, T/size, size, ...]``."""
    x = F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad))
    return x.reshape(x.shape[0], -1, size, *x.shape[2:])


def _time_steps(dt: torch.Tensor, dt_bias: torch.Tensor | None, softplus: bool,
                limit: tuple[float, float]) -> torch.Tensor:
    if dt_bias is not None:
        dt = dt + dt_bias.to(dt.dtype)
    if softplus:
        dt = F.softplus(dt)
    return torch.clamp(dt, min=limit[0], max=limit[1])


def chunk_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
               chunk_size: int, D: torch.Tensor | None = None, dt_bias: torch.Tensor | None = None,
               dt_softplus: bool = False, dt_limit: tuple[float, float] = (0.0, math.inf),
               seq_idx: torch.Tensor | None = None, initial_states: torch.Tensor | None = None,
               return_final_states: bool = False, **_: Any) -> Any:
    """Mamba2's chunked SSD scan with document resets; ``mamba_chunk_scan_combined``'s signature.

    ``x: [b, T, h, p]``, ``dt: [b, T, h]``, ``A: [h]``, ``B, C: [b, T, g, n]``, ``seq_idx: [b, T]``
    (non-decreasing), ``initial_states: [b, h, p, n]`` (the state before ``x``, continued by the
    row's first document). Returns ``y: [b, T, h, p]`` (and the final state ``[b, h, p, n]``).
    Letters below: c = chunk, l/s = positions in a chunk, z = source chunk.
    """
    b, t, h, p = x.shape
    f = torch.promote_types(x.dtype, torch.float32)  # fp32 for bf16/fp32 inputs, as transformers; fp64 stays
    dt = _time_steps(dt, dt_bias, dt_softplus, dt_limit).to(f)
    x = x.to(f)
    B = B.to(f).repeat_interleave(h // B.shape[2], dim=2)
    C = C.to(f).repeat_interleave(h // C.shape[2], dim=2)
    pad = (chunk_size - t % chunk_size) % chunk_size
    seq = torch.zeros(b, t, dtype=torch.int32, device=x.device) if seq_idx is None else seq_idx
    seq = torch.cat([seq, seq[:, -1:].expand(b, pad)], dim=1).view(b, -1, chunk_size)  # [b, c, l]
    y_skip = None if D is None else D[:, None].to(f) * x  # [b, T, h, p]

    x, dA, B, C = (_chunks(v, pad, chunk_size) for v in (x * dt[..., None], A.to(f) * dt, B, C))
    dA = dA.permute(0, 3, 1, 2)  # [b, h, c, l]
    dA_cum = torch.cumsum(dA, dim=-1)

    # 1. within a chunk: attention-like L[l, s] = exp(dA[s+1..l]), 0 across documents
    same = seq[:, :, :, None] == seq[:, :, None, :]  # [b, c, l, s]
    L = torch.exp(_segsum(dA).masked_fill_(~same[:, None], -math.inf))  # [b, h, c, l, s]
    scores = torch.einsum("bclhn,bcshn->bclsh", C, B) * L.permute(0, 2, 3, 4, 1)
    y = torch.einsum("bclsh,bcshp->bclhp", scores, x)

    # 2. each chunk's final state, from the tokens of the chunk's last document only
    last_doc = seq[:, :, -1:] == seq  # [b, c, l]
    decay = torch.where(last_doc[:, None], torch.exp(dA_cum[..., -1:] - dA_cum), 0.0)  # [b, h, c, l]
    states = torch.einsum("bclhn,bclhp->bchpn", B * decay.permute(0, 2, 3, 1)[..., None], x)

    # 3. carry between chunks: the state at the end of chunk z reaches the end of chunk c-1 only
    #    if no document starts in between (same document at both ends; seq is non-decreasing)
    start = states.new_zeros(b, 1, h, p, states.shape[-1]) if initial_states is None else \
        initial_states[:, None].to(states)
    states = torch.cat([start, states], dim=1)  # [b, 1 + c, h, p, n]
    end_doc = torch.cat([seq[:, :1, 0], seq[:, :, -1]], dim=1)  # [b, 1 + c]: doc at each state
    same_end = end_doc[:, :, None] == end_doc[:, None, :]  # [b, c', z]
    carry = torch.exp(_segsum(F.pad(dA_cum[..., -1], (1, 0))).masked_fill_(~same_end[:, None], -math.inf))
    states = torch.einsum("bzch,bzhpn->bchpn", carry.transpose(1, 3), states)
    states, final = states[:, :-1], states[:, -1]

    # 4. read the carried state out, for the tokens of the document it belongs to
    carried = seq == end_doc[:, :-1, None]  # [b, c, l]
    decay_out = torch.where(carried[:, None], torch.exp(dA_cum), 0.0)  # [b, h, c, l]
    y = y + torch.einsum("bclhn,bchpn->bclhp", C, states) * decay_out.permute(0, 2, 3, 1)[..., None]

    y = y.reshape(b, -1, h, p)[:, :t]
    if y_skip is not None:
        y = y + y_skip
    return (y, final) if return_final_states else y


# --------------------------------------------------------------------------- fused kernels (GPU)


@dataclass(frozen=True)
class FusedKernels:
    """``causal_conv1d`` and ``mamba_ssm`` entry points; each takes ``seq_idx`` (int32 ``[B, T]``)."""

    causal_conv1d_fn: Callable[..., torch.Tensor]
    mamba_chunk_scan_combined: Callable[..., Any]
    mamba_split_conv1d_scan_combined: Callable[..., torch.Tensor]


@functools.cache
def _import_kernels() -> FusedKernels | None:
    try:
        from causal_conv1d import causal_conv1d_fn
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined
    except Exception:  # not installed, or built for another torch/CUDA
        return None
    return FusedKernels(causal_conv1d_fn, mamba_chunk_scan_combined, mamba_split_conv1d_scan_combined)


def fused_kernels(device: torch.device) -> FusedKernels | None:
    """The fused kernels when ``device`` is CUDA and both packages import; None: the pure-torch ops here."""
    return _import_kernels() if device.type == "cuda" else None


# --------------------------------------------------------------------------- the mixer


def mixer_forward(mixer: Any, hidden_states: torch.Tensor, cache_params: Any = None,
                  attention_mask: torch.Tensor | None = None, seq_idx: torch.Tensor | None = None,
                  **kwargs: Any) -> torch.Tensor:
    """``NemotronHMamba2Mixer.forward`` with ``seq_idx: [B, T]``; without it, transformers' own forward.

    The same four steps as transformers (in_proj -> conv -> SSD scan -> gated norm, out_proj),
    with the conv and scan from :func:`fused_kernels` or the pure-torch ops above.
    """
    if kwargs.get("cp_shard") is not None:  # a context-parallel pass (training.context_parallel)
        shard = kwargs["cp_shard"]
        return cp_mixer_forward(mixer, hidden_states, index=shard.index, gather_index=shard.gather_index,
                                doc=shard.doc, group=shard.group)
    if seq_idx is None:
        return type(mixer).forward(mixer, hidden_states, cache_params=cache_params,
                                   attention_mask=attention_mask, **kwargs)
    if cache_params is not None:
        raise ValueError("packed rows (seq_idx) cannot fill a generation cache: call the model with use_cache=False")
    b, t, _ = hidden_states.shape
    h, p, g, n = mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size
    seq_idx = seq_idx.to(device=hidden_states.device, dtype=torch.int32).expand(b, t).contiguous()  # [1, T] rows too
    dtype = hidden_states.dtype
    if attention_mask is not None:
        hidden_states = (hidden_states * attention_mask[:, :, None]).to(dtype)
    zxbcdt = mixer.in_proj(hidden_states)  # [B, T, inner + conv_dim + h]
    A = -torch.exp(mixer.A_log.float())
    kernels = fused_kernels(hidden_states.device)
    if kernels is not None and mixer.training and attention_mask is None:
        # out_proj stays a module call (not its .weight inside the kernel): a LoRA on it still counts
        y = kernels.mamba_split_conv1d_scan_combined(
            zxbcdt, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, mixer.dt_bias, A, D=mixer.D,
            chunk_size=mixer.chunk_size, seq_idx=seq_idx, dt_limit=mixer.time_step_limit,
            activation=mixer.activation, rmsnorm_weight=mixer.norm.weight, rmsnorm_eps=mixer.norm.variance_epsilon,
            headdim=p, ngroups=g, norm_before_gate=False)  # [B, T, inner]
        return mixer.out_proj(y.to(dtype))

    gate, xBC, dt = zxbcdt.split([mixer.intermediate_size, mixer.conv_dim, h], dim=-1)
    conv = kernels.causal_conv1d_fn if kernels is not None else causal_conv1d
    xBC = conv(xBC.transpose(1, 2), mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias,
               activation=mixer.activation, seq_idx=seq_idx).transpose(1, 2)  # [B, T, conv_dim]
    if attention_mask is not None:
        xBC = (xBC * attention_mask[:, :, None]).to(xBC.dtype)
    x, B, C = xBC.split([mixer.intermediate_size, g * n, g * n], dim=-1)
    scan = kernels.mamba_chunk_scan_combined if kernels is not None else chunk_scan
    y = scan(x.reshape(b, t, h, p), dt, A, B.reshape(b, t, g, n), C.reshape(b, t, g, n),
             chunk_size=mixer.chunk_size, D=mixer.D, dt_bias=mixer.dt_bias, dt_softplus=True,
             dt_limit=mixer.time_step_limit, seq_idx=seq_idx)
    y = mixer.norm(y.reshape(b, t, -1), gate)
    return mixer.out_proj(y.to(dtype))


# --------------------------------------------------------------------------- installing it


def _add_seq_idx(trunk: Any, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]] | None:
    """Trunk pre-hook: packed rows (position ids restart inside a row) get ``seq_idx`` for the mixers."""
    position_ids = kwargs.get("position_ids")
    if kwargs.get("seq_idx") is not None or position_ids is None or position_ids.dim() != 2:
        return None
    if kwargs.get("past_key_values") is not None or kwargs.get("attention_mask") is not None:
        return None  # generation (left padding also restarts positions): not a packed row
    seq_idx = seq_idx_from_position_ids(position_ids)
    if not bool((seq_idx[:, -1] > 0).any()):
        return None  # one document per row: transformers' path is already exact
    if kwargs.get("use_cache"):
        raise ValueError("a packed row (position_ids restart inside it) cannot fill a generation cache: "
                         "call the model with use_cache=False")
    return args, {**kwargs, "seq_idx": seq_idx, "use_cache": False}


def supports(module: Any) -> bool:
    """True for the Mamba layers this module makes exact under packing."""
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHMamba2Mixer

    return isinstance(module, NemotronHMamba2Mixer)


def enable_exact_packing(model: Any) -> int:
    """Make packed rows exact for every NemotronH Mamba2 layer of ``model``; returns how many (idempotent).

    Patches instances only (no class or transformers module is touched, so other models in the
    process are unaffected) and marks each patched module, so wrapping (peft, FSDP) and calling
    again adds nothing.
    """
    from transformers.models.nemotron_h.modeling_nemotron_h import NemotronHModel

    mixers = [m for m in model.modules() if supports(m)]
    fresh = [m for m in mixers if not getattr(m, _MARK, False)]
    for mixer in fresh:
        mixer.forward = types.MethodType(mixer_forward, mixer)
        setattr(mixer, _MARK, True)
    for trunk in (m for m in model.modules() if isinstance(m, NemotronHModel) and not getattr(m, _MARK, False)):
        trunk.register_forward_pre_hook(_add_seq_idx, with_kwargs=True)
        setattr(trunk, _MARK, True)
    if fresh:
        log.info("exact packing on: %d Mamba2 layers reset conv/SSM state at document starts", len(fresh))
    return len(mixers)


def exact_packing_enabled(model: Any) -> bool:
    """True when ``model`` has Mamba2 layers and all of them are patched."""
    mixers = [m for m in model.modules() if supports(m)]
    return bool(mixers) and all(getattr(m, _MARK, False) for m in mixers)


# --------------------------------------------------------------------------- context parallelism
#
# Under CP a rank holds a few contiguous runs of the row (load-balanced: chunks r and 2N-1-r of
# 2N). The scan is linear in its entering state, so each run is scanned from a zero state, giving
# its outputs y0, its final state F and how an entering state passes through it (``through``:
# exp(sum dA) if the run is one document continuing from the token before, else 0). The tiny
# per-run (F, through) are all-gathered, every rank runs the recurrence h_in[j+1] =
# through[j] * h_in[j] + F[j] over the runs in row order, and adds the carried state's read-out
# C_l . h_in * exp(cumsum dA)_l to the tokens of the run's first document, as chunk_scan's
# inter-chunk step does. The conv reads the last K-1 conv inputs of the run before. The
# all-gather's backward returns each rank its runs' state gradients summed over the group.


def _runs(index: torch.Tensor) -> list[tuple[int, int]]:
    """(start, stop) of the runs of consecutive values in ``index: [t]`` (global positions)."""
    breaks = ((index[1:] != index[:-1] + 1).nonzero().flatten() + 1).tolist()
    bounds = [0, *breaks, len(index)]
    return list(zip(bounds[:-1], bounds[1:]))


class _GatherStates(torch.autograd.Function):
    """All-gather ``x`` over the group -> ``[N, *x.shape]``; backward: all-reduce, keep this rank's slice.

    The gathered tensors are tiny (a state per chunk), so an all-reduce of the whole gradient is
    simpler than a reduce-scatter (which gloo lacks) and costs nothing that matters.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        import torch.distributed as dist

        ctx.group, ctx.rank = group, dist.get_rank(group)
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank], None


def _all_gather(parts: list[torch.Tensor], most: int, group: Any) -> torch.Tensor:
    """Every rank's ``parts`` (one per run, zero-padded to ``most`` runs): ``[N, most, ...]`` in rank order."""
    import torch.distributed as dist

    x = torch.stack(parts)
    x = torch.cat([x, x.new_zeros(most - len(parts), *x.shape[1:])]) if most > len(parts) else x
    if group is None or dist.get_world_size(group) == 1:
        return x[None]
    return _GatherStates.apply(x, group)


@dataclass(frozen=True)
class _Runs:
    """Where this rank's runs of the row lie, and which gathered slot holds each rank's run values."""

    local: list[tuple[int, int]]  # (start, stop) of this rank's runs, in local positions
    starts: list[int]  # their first global positions
    by_start: dict[int, tuple[int, int]]  # first global position of every run -> (rank, slot)
    by_end: dict[int, tuple[int, int]]  # last global position of every run -> (rank, slot)
    slots: int  # most runs on one rank


def _cp_runs(index: torch.Tensor, gather_index: torch.Tensor, window: int) -> _Runs:
    t = len(index)
    by_start, by_end, slots = {}, {}, 0
    for r in range(len(gather_index) // t):
        block = gather_index[r * t : (r + 1) * t]
        for j, (s, e) in enumerate(_runs(block)):
            if e - s < window:
                raise ValueError(f"a context-parallel chunk of {e - s} tokens is shorter than the Mamba conv "
                                 f"window ({window}); use longer rows or a smaller train.context_parallel")
            by_start[int(block[s])] = by_end[int(block[e - 1])] = (r, j)
            slots = max(slots, j + 1)
    local = _runs(index)
    return _Runs(local, [int(index[s]) for s, _ in local], by_start, by_end, slots)


def _cp_conv(mixer: Any, xBC: torch.Tensor, runs: _Runs, seq: torch.Tensor, row_seq: torch.Tensor,
             group: Any) -> torch.Tensor:
    """Conv of ``xBC: [B, t, C]``: each run continues from the last K-1 inputs of the run before it."""
    k = mixer.conv_kernel_size
    tails = _all_gather([xBC[:, e - (k - 1) : e] for _, e in runs.local], runs.slots, group)  # [N, R, B, K-1, C]
    out = []
    for (s, e), g0 in zip(runs.local, runs.starts):
        prev = prev_seq = None
        if g0 > 0:
            r, j = runs.by_end[g0 - 1]
            prev, prev_seq = tails[r, j].transpose(1, 2), row_seq[:, g0 - (k - 1) : g0]  # [B, C, K-1], [B, K-1]
        out.append(causal_conv1d(xBC[:, s:e].transpose(1, 2), mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias,
                                 mixer.activation, seq_idx=seq[:, s:e], initial_states=prev,
                                 initial_seq_idx=prev_seq).transpose(1, 2))
    return torch.cat(out, dim=1)


def _cp_scan(mixer: Any, x: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, runs: _Runs,
             seq: torch.Tensor, row_seq: torch.Tensor, group: Any) -> torch.Tensor:
    """SSD scan of ``x: [B, t, h, p]`` (``B, C: [B, t, g, n]``): each run starts from the state the row
    before it leaves; returns ``[B, t, h, p]``."""
    h, g = x.shape[2], B.shape[2]
    A = -torch.exp(mixer.A_log.float())
    local, finals, through = [], [], []
    for (s, e), g0 in zip(runs.local, runs.starts):
        y0, final = chunk_scan(x[:, s:e], dt[:, s:e], A, B[:, s:e], C[:, s:e], chunk_size=mixer.chunk_size, D=mixer.D,
                               dt_bias=mixer.dt_bias, dt_softplus=True, dt_limit=mixer.time_step_limit,
                               seq_idx=seq[:, s:e], return_final_states=True)
        cum = torch.cumsum(A * _time_steps(dt[:, s:e], mixer.dt_bias, True, mixer.time_step_limit).float(), 1)
        cont = row_seq[:, g0 - 1] == row_seq[:, g0] if g0 > 0 else torch.zeros_like(seq[:, 0], dtype=torch.bool)
        reached = (seq[:, s:e] == seq[:, s : s + 1]) & cont[:, None]  # [B, T_run]: tokens an entering state reaches
        local.append((y0, cum, reached))
        finals.append(final)  # [B, h, p, n]
        through.append(torch.exp(cum[:, -1]) * reached[:, -1:])  # [B, h]: 0 if a document starts in the run
    all_finals = _all_gather(finals, runs.slots, group)  # [N, R, B, h, p, n]
    all_through = _all_gather(through, runs.slots, group)  # [N, R, B, h]
    entering, state = {}, torch.zeros_like(finals[0])  # the recurrence over all runs in row order
    for g0 in sorted(runs.by_start):
        r, j = runs.by_start[g0]
        entering[g0] = state
        state = all_through[r, j][..., None, None] * state + all_finals[r, j]
    ys = []
    for (s, e), g0, (y0, cum, reached) in zip(runs.local, runs.starts, local):
        c = C[:, s:e].float().repeat_interleave(h // g, dim=2)  # [B, T_run, h, n]
        decay = torch.exp(cum) * reached[..., None]  # [B, T_run, h]
        ys.append(y0 + torch.einsum("bthn,bhpn->bthp", c, entering[g0]) * decay[..., None])
    return torch.cat(ys, dim=1)


def cp_mixer_forward(mixer: Any, hidden_states: torch.Tensor, *, index: torch.Tensor, gather_index: torch.Tensor,
                     doc: torch.Tensor, group: Any) -> torch.Tensor:
    """The Mamba2 mixer on this rank's share ``hidden_states: [B, t, H]`` of a context-parallel row.

    ``index: [t]`` global positions of the local tokens, ``gather_index: [N*t]`` every rank's in
    rank order, ``doc: [B, L]`` the document id of every token of the row, ``group`` the cp group
    (``training.context_parallel.CPShard`` carries them). Equal to the mixer on the whole row,
    document by document; padding is a document of its own, so needs no mask.
    """
    b, t, _ = hidden_states.shape
    h, p, g, n = mixer.num_heads, mixer.head_dim, mixer.n_groups, mixer.ssm_state_size
    runs = _cp_runs(index, gather_index, mixer.conv_kernel_size - 1)
    change = torch.ones_like(doc, dtype=torch.int32)
    change[:, 1:] = (doc[:, 1:] != doc[:, :-1]).to(torch.int32)
    row_seq = change.cumsum(1, dtype=torch.int32) - 1  # [B, L] non-decreasing document numbers
    seq = row_seq[:, index]  # [B, t]
    gate, xBC, dt = mixer.in_proj(hidden_states).split([mixer.intermediate_size, mixer.conv_dim, h], dim=-1)
    x, B, C = _cp_conv(mixer, xBC, runs, seq, row_seq, group).split([mixer.intermediate_size, g * n, g * n], dim=-1)
    y = _cp_scan(mixer, x.reshape(b, t, h, p), dt, B.reshape(b, t, g, n), C.reshape(b, t, g, n), runs, seq,
                 row_seq, group)
    y = mixer.norm(y.reshape(b, t, -1), gate)
    return mixer.out_proj(y.to(hidden_states.dtype))
