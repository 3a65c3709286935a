"""Group-relative length control of GenRM rewards (reference recipe, DESIGN.md §1).

Within one prompt's group, reasoning length and answer length each move the reward by a
zero-sum amount (the shortest gains, the longest loses: no net reward is created), and the
shortest of the best-rewarded responses earns a bonus. The rule follows NeMo-Gym
``genrm_compare`` (min-max scaled, mean-centred weights); defaults are the coefficients of the
published Nemotron RLHF config (reasoning 0.3, answer 0.35, bonus 0.5, top 20%).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class LengthControl:
    """Coefficients of the length adjustments; zero turns a part off.

    reasoning_coef / answer_coef: a response's reward moves by coef * w, with
      w = (1 - (len - min) / (max - min)) minus its group mean (so the w sum to 0).
    short_bonus: added to the shortest response (reasoning + answer) among the top_fraction
      of the group by reward (at least one response; ties at the cut are in); the reference
      recipe's alpha = 0.5. Tied shortest responses share it equally; an empty answer never earns it.
    bonus_scope: "top" = the shortest among those top responses (DESIGN.md §1); "group" = the
      group's shortest, and only if it is among them (what NeMo-Gym's code does).
    """

    reasoning_coef: float = 0.3
    answer_coef: float = 0.35
    short_bonus: float = 0.5
    top_fraction: float = 0.2
    bonus_scope: Literal["top", "group"] = "top"

    def __post_init__(self) -> None:
        for name in ("reasoning_coef", "answer_coef", "short_bonus"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"length_control.{name} must be >= 0; 0 turns it off (got {getattr(self, name)!r})")
        if not 0 < self.top_fraction <= 1:
            raise ValueError(f"length_control.top_fraction must be in (0, 1] (got {self.top_fraction!r})")
        if self.bonus_scope not in ("top", "group"):
            raise ValueError(f"length_control.bonus_scope must be top or group (got {self.bonus_scope!r})")


def relative_shortness(lengths: Sequence[int]) -> list[float]:
    """Zero-sum weights, shorter = higher: min-max scaled shortness minus its group mean."""
    low, high = min(lengths), max(lengths)
    if high == low:
        return [0.0] * len(lengths)
    raw = [1.0 - (length - low) / (high - low) for length in lengths]
    mean = sum(raw) / len(raw)
    return [r - mean for r in raw]


def _bonus_winners(rewards: Sequence[float], totals: Sequence[int], answer_lengths: Sequence[int],
                   cfg: LengthControl) -> list[int]:
    """Indices sharing the short bonus (empty when lengths say nothing or nobody qualifies)."""
    if min(totals) == max(totals):
        return []  # every response is as long as the others: nobody is the short one
    keep = max(1, int(len(rewards) * cfg.top_fraction))
    cut = sorted(rewards, reverse=True)[keep - 1]
    top = {i for i, r in enumerate(rewards) if r >= cut}
    pool = [i for i in range(len(rewards)) if answer_lengths[i] > 0]
    if cfg.bonus_scope == "top":
        pool = [i for i in pool if i in top]
    if not pool:
        return []
    shortest = min(totals[i] for i in pool)
    return [i for i in pool if totals[i] == shortest and i in top]


def apply_length_control(rewards: Sequence[float], reasoning_lengths: Sequence[int],
                         answer_lengths: Sequence[int], cfg: LengthControl) -> list[float]:
    """``rewards`` of one group after the length penalties and the short bonus.

    Lengths are whatever unit the caller counts (tokens here; NeMo-Gym counts characters).
    The bonus picks its winner from the rewards given, before the penalties move them.
    Groups of fewer than two responses are returned unchanged.
    """
    n = len(rewards)
    if len(reasoning_lengths) != n or len(answer_lengths) != n:
        raise ValueError(f"length control needs one reasoning and one answer length per reward (got {n} "
                         f"rewards, {len(reasoning_lengths)} reasoning, {len(answer_lengths)} answer lengths)")
    out = [float(r) for r in rewards]
    if n < 2:
        return out
    reasoning_w = relative_shortness(reasoning_lengths)
    answer_w = relative_shortness(answer_lengths)
    totals = [a + b for a, b in zip(reasoning_lengths, answer_lengths)]
    winners = _bonus_winners(rewards, totals, answer_lengths, cfg) if cfg.short_bonus > 0 else []
    for i in range(n):
        out[i] += cfg.reasoning_coef * reasoning_w[i] + cfg.answer_coef * answer_w[i]
    for i in winners:
        out[i] += cfg.short_bonus / len(winners)
    return out
