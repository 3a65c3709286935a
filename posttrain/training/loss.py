"""Token losses that never materialise full ``[tokens, vocab]`` logits.

Why our own instead of ``model(labels=...)``: the HF path builds logits for every position
(``[T, V]`` floats, 6 GiB at 32K tokens x 49K vocab in fp32, twice that with gradients). Here
only positions that carry loss are projected, a chunk at a time, and each chunk is recomputed
in the backward pass, so peak extra memory is one ``[chunk, V]`` block however long the
sequence (one, not the three a checkpointed ``log_softmax`` keeps: :class:`_ChunkLogprobs`).
TRL 1.16 chunks too, but its CPU fallback keeps a ~3 GiB fixed cost and the loss here is the
plain sum we need for exact token normalisation across micro-batches and data-parallel ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


class _ChunkLogprobs(torch.autograd.Function):
    """``[c]`` log p(targets) of one chunk with one ``[c, V]`` fp32 buffer alive, forward or backward.

    The plain composition (linear, ``.float()``, ``log_softmax``, ``gather``, recomputed under
    ``checkpoint``) keeps three ``[c, V]`` tensors alive in its backward (logits, log-softmax and
    their gradient): at 2048 positions x 49K vocab that is 1.2 GB of fixed cost per step, the
    largest term of a small model's activation memory at long context. Here forward keeps only
    the ``[c]`` log-sum-exp; backward recomputes the logits once and turns them, in place, into
    ``g * (onehot - softmax) / temperature``, the gradient of the logits.
    """

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, inv_temp: float) -> torch.Tensor:
        # hidden: [c, H], weight: [V, H], targets: [c] -> [c]
        logits = _scaled_logits(hidden, weight, bias, inv_temp)  # [c, V] fp32, ours to overwrite
        picked = logits.gather(1, targets[:, None])[:, 0]  # [c]
        top = logits.amax(dim=1, keepdim=True)  # [c, 1]
        lse = logits.sub_(top).exp_().sum(dim=1).log_().add_(top[:, 0])  # [c]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.inv_temp = inv_temp
        return picked - lse

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        logits = _scaled_logits(hidden, weight, bias, ctx.inv_temp)  # [c, V]
        # d(picked - lse)/d logits = onehot(target) - softmax; chained with grad and 1/temperature
        dlogits = logits.sub_(lse[:, None]).exp_().mul_(-grad[:, None])
        dlogits.scatter_add_(1, targets[:, None], grad[:, None].to(dlogits.dtype))
        if ctx.inv_temp != 1.0:
            dlogits.mul_(ctx.inv_temp)
        dlogits = dlogits.to(weight.dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        with _no_autocast(hidden):
            return ((dlogits @ weight).to(hidden.dtype) if need_h else None,
                    dlogits.T @ hidden.to(weight.dtype) if need_w else None,
                    dlogits.sum(0) if need_b else None, None, None)


def _scaled_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   inv_temp: float) -> torch.Tensor:
    """``[c, V]`` fp32 ``head(hidden) / temperature``, a fresh tensor the caller may overwrite. Under
    autocast (``train.mixed_precision``) the head still runs in its weights' dtype: bf16 logits would
    put errors of ~0.05 into every logprob of a 49K-token softmax, and RL's importance ratios read them."""
    with _no_autocast(hidden):
        logits = F.linear(hidden.to(weight.dtype), weight, bias)
    logits = logits.float() if logits.dtype != torch.float32 else logits
    return logits.mul_(inv_temp) if inv_temp != 1.0 else logits


def _no_autocast(t: torch.Tensor) -> torch.autocast:
    return torch.autocast(device_type=t.device.type, enabled=False)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   bias: torch.Tensor | None = None, temperature: float = 1.0,
                   chunk_size: int = 2048) -> torch.Tensor:
    """``[N]`` log p(targets) under ``softmax(head(hidden) / temperature)``, a chunk at a time.

    ``hidden: [N, H]`` final hidden states of the positions that predict ``targets: [N]``;
    ``weight: [V, H]`` the LM head. Each chunk is recomputed in backward, so at most one
    ``[chunk_size, V]`` fp32 block of logits exists at a time (:class:`_ChunkLogprobs`).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 (got {chunk_size})")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for logprobs (got {temperature}); greedy has none")
    if hidden.shape[0] != targets.shape[0]:
        raise ValueError(f"hidden has {hidden.shape[0]} rows but targets {targets.shape[0]}")
    parts = []
    for start in range(0, hidden.shape[0], chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        parts.append(_ChunkLogprobs.apply(h, weight, bias, t, 1.0 / temperature))
    return torch.cat(parts) if parts else hidden.new_zeros((0,), dtype=torch.float32)


def chunked_nll_sum(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                    bias: torch.Tensor | None = None, chunk_size: int = 2048) -> torch.Tensor:
    """Sum of token negative log-likelihoods (0-dim fp32; 0 when ``N == 0``), see :func:`token_logprobs`."""
    return -token_logprobs(hidden, weight, targets, bias, 1.0, chunk_size).sum()


def trunk_and_head(model: Any) -> tuple[Any, Any]:
    """(decoder trunk returning hidden states, LM head) of an HF causal LM or a peft wrapper."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, base.base_model_prefix), base.get_output_embeddings()


FSDP_ROOT_METHOD = "posttrain_in_root"  # set on FSDP roots by training.parallel.shard_model


def in_root(model: Any, fn: Any, *args: Any) -> Any:
    """``fn(*args)``; under FSDP2 (``training.parallel.shard_model``) run as a forward of the root
    module, so its parameters (embeddings, final norm, LM head: used outside ``forward`` by the
    chunked loss) are gathered for the whole call and their gradients reduce-scattered in backward."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        return getattr(model, FSDP_ROOT_METHOD)(fn, *args)
    return fn(*args)


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """``labels: [B, T]`` -> next-token targets ``[B, T]`` (last position of each row ignored).

    Packed rows need no special care at the seams: the first token of each document is
    labelled ``IGNORE_INDEX`` by the collator, so no document predicts the next one's start.
    """
    out = torch.full_like(labels, IGNORE_INDEX)
    out[:, :-1] = labels[:, 1:]
    return out


def causal_lm_nll_sum(model: Any, batch: dict[str, torch.Tensor],
                      chunk_size: int = 2048) -> tuple[torch.Tensor, int]:
    """(sum of NLL over labelled tokens, number of labelled tokens) for one micro-batch.

    Runs the decoder trunk only (no logits), then :func:`chunked_nll_sum` on the labelled
    positions. ``batch`` holds ``input_ids``/``labels: [B, T]`` and optionally
    ``attention_mask``/``position_ids: [B, T]``. Works for HF causal LMs and peft wrappers.
    """
    return in_root(model, _causal_lm_nll_sum, model, batch, chunk_size)


def _causal_lm_nll_sum(model: Any, batch: dict[str, torch.Tensor], chunk_size: int) -> tuple[torch.Tensor, int]:
    """The body of :func:`causal_lm_nll_sum` (run inside the FSDP root's hooks when sharded)."""
    trunk, head = trunk_and_head(model)
    inputs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    hidden = trunk(**inputs, use_cache=False).last_hidden_state  # [B, T, H]
    targets = shifted_targets(batch["labels"])  # [B, T]
    keep = targets != IGNORE_INDEX  # [B, T]
    n_tokens = int(keep.sum())
    nll = chunked_nll_sum(hidden[keep], head.weight, targets[keep], head.bias, chunk_size)
    return nll, n_tokens
