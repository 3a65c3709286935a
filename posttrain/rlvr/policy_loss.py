"""The clipped policy-gradient loss with the reference recipe's corrections.

Per token ``t`` of rollout ``i`` (advantage ``A_i``):

    ratio      = exp(logp_new - logp_old)              # trainer now vs trainer at rollout time
    pg         = -min(ratio * A, clip(ratio, 1 - eps_low, 1 + eps_high) * A)
    is_weight  = min(exp(logp_old - logp_rollout), cap)   # trainer vs the engine that sampled
    loss_tok   = is_weight * pg + kl_coef * k3(ref || new)

Asymmetric clipping (0.2 / 0.28, DAPO's "clip-higher") leaves room for unlikely good tokens
to grow. The engine (vLLM, bf16, other kernels) never computes exactly the trainer's
probabilities: the importance weight corrects the small mismatch, and a sequence whose
mismatch is large (``exp(mean_t |logp_old - logp_rollout|) > seq_error_threshold``, the
recipe's 2.0) is masked out rather than trusted.

Aggregation: ``token_mean`` (DAPO, the recipe: every token of the batch weighs the same),
``seq_mean_token_mean`` (original GRPO), ``seq_mean_token_sum_norm`` (Dr.GRPO: token sums
divided by a constant, ``sum_norm`` = the generation length, so long answers are not favoured or
penalised by their length). The settings are :class:`posttrain.rlvr.config.LossConfig`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.rlvr.config import LossConfig


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable
    metrics: dict[str, float]
    mask: torch.Tensor  # [B, T] the tokens that counted


def sequence_mismatch(logp_old: torch.Tensor, logp_rollout: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B] multiplicative probability error of each sequence: exp(mean_t |logp_old - logp_rollout|)."""
    diff = (logp_old - logp_rollout).abs() * mask
    return torch.exp(diff.sum(-1) / mask.sum(-1).clamp(min=1))


def policy_loss(logp_new: torch.Tensor, logp_old: torch.Tensor, logp_rollout: torch.Tensor,
                advantages: torch.Tensor, mask: torch.Tensor, cfg: LossConfig = LossConfig(),
                logp_ref: torch.Tensor | None = None, total_tokens: float | None = None) -> LossOutput:
    """All log-prob tensors [B, T] over completion tokens; ``advantages`` [B]; ``mask`` [B, T] 0/1.

    ``total_tokens``: the token count of the whole batch when it is processed in micro-batches
    (so that ``token_mean`` over micro-batches sums to the batch's token mean).
    """
    mask = mask.to(logp_new.dtype)
    with torch.no_grad():
        mismatch = sequence_mismatch(logp_old, logp_rollout, mask)  # [B]
        if cfg.seq_error_threshold is not None:
            mask = mask * (mismatch <= cfg.seq_error_threshold).to(mask.dtype).unsqueeze(-1)
        is_weight = (torch.exp(logp_old - logp_rollout).clamp(max=cfg.is_cap)
                     if cfg.importance_sampling else torch.ones_like(logp_old))
    adv = advantages.to(logp_new.dtype).unsqueeze(-1)  # [B, 1]
    ratio = torch.exp(logp_new - logp_old)
    clipped = ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high)
    pg = -torch.minimum(ratio * adv, clipped * adv)
    per_token = is_weight * pg
    kl = torch.zeros_like(per_token)
    if logp_ref is not None and cfg.kl_coef > 0:
        delta = logp_ref - logp_new
        kl = torch.exp(delta) - delta - 1  # k3: unbiased, always >= 0
        per_token = per_token + cfg.kl_coef * kl
    loss = aggregate(per_token, mask, cfg, total_tokens)
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        was_clipped = ((ratio - clipped).abs() > 1e-8).to(mask.dtype)
        metrics = {
            "loss/pg": float((pg * mask).sum() / n),
            "loss/kl": float((kl * mask).sum() / n),
            "loss/clip_fraction": float((was_clipped * mask).sum() / n),
            "loss/ratio_mean": float((ratio * mask).sum() / n),
            "loss/is_weight_mean": float((is_weight * mask).sum() / n),
            "loss/is_weight_max": float((is_weight * mask).max()) if mask.numel() else 0.0,
            "mismatch/seq_error_max": float(mismatch.max()) if mismatch.numel() else 0.0,
            "mismatch/masked_sequences": float((mask.sum(-1) == 0).sum()),
            "tokens/trained": float(mask.sum()),
        }
    return LossOutput(loss, metrics, mask)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, cfg: LossConfig,
              total_tokens: float | None = None) -> torch.Tensor:
    if cfg.aggregation == "token_mean":
        return (per_token * mask).sum() / (total_tokens if total_tokens is not None else mask.sum().clamp(min=1))
    # Sequence means count only sequences with trained tokens (masked ones would dilute them).
    n_seq = (mask.sum(-1) > 0).sum().clamp(min=1)
    if cfg.aggregation == "seq_mean_token_mean":
        return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).sum() / n_seq
    if cfg.aggregation == "seq_mean_token_sum_norm":
        if cfg.sum_norm is None:
            raise ValueError("seq_mean_token_sum_norm needs LossConfig.sum_norm (RLVRConfig.loss_config() sets it "
                             "to generation.max_new_tokens)")
        return ((per_token * mask).sum(-1) / cfg.sum_norm).sum() / n_seq
    raise ValueError(f"aggregation must be token_mean, seq_mean_token_mean or seq_mean_token_sum_norm "
                     f"(got {cfg.aggregation!r})")


def overlong_mask(finish_reasons: list[str]) -> torch.Tensor:
    """[B] 1.0 for rollouts that ended by themselves, 0.0 for those cut at max tokens.

    Overlong filtering (DAPO): a truncated rollout's reward says nothing about its answer.
    """
    return torch.tensor([0.0 if r == "length" else 1.0 for r in finish_reasons])
