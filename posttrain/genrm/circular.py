"""Which rollouts the GenRM compares, and how its pairwise judgements become one reward each.

A group of N rollouts of one prompt is judged pair by pair. ``circular`` (the reference
recipe) compares rollout i with rollout (i+1) mod N: N judge calls instead of N(N-1)/2.
:func:`orient` decides which of the two the judge sees first; :func:`aggregate` reads each
judgement in that orientation (first shown = response 1) and returns a reward per rollout.
Pure Python: no numpy, no torch.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from itertools import combinations
from typing import Literal

from posttrain.genrm.judge_format import Judgement

Mode = Literal["circular", "all_pairs", "k_neighbours"]
Rule = Literal["reference", "margin", "joint"]
MODES: tuple[str, ...] = ("circular", "all_pairs", "k_neighbours")
RULES: tuple[str, ...] = ("reference", "margin", "joint")
NEUTRAL_SCORE = 3.0  # reward of a rollout no parsed comparison speaks about
RANKING_MIDPOINT = 3.5  # ranking < 3.5: response 1 preferred
MARGIN_STEP = 0.125  # margin: score points per ranking step away from the midpoint
JOINT_STEP = 0.5  # joint: score difference implied per ranking step away from the midpoint
JOINT_WEIGHT = 0.25  # joint: weight of that difference against each absolute score
_RIDGE = 1e-6  # joint: pull toward NEUTRAL_SCORE; keeps the system solvable, moves nothing else


def pairs(n: int, mode: Mode, k: int = 2) -> list[tuple[int, int]]:
    """The comparisons of a group of ``n`` rollouts: each unordered pair at most once.

    circular: (i, i+1 mod n), n calls (n = 2 gives the single pair (0, 1): the reference's
    second call (1, 0) would judge the same two responses again, swapped); all_pairs:
    n(n-1)/2 calls; k_neighbours: i with i+1 .. i+k mod n (n*k calls while 2k < n).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"genrm pairs need a group of n >= 2 rollouts to compare (got n={n!r})")
    if mode not in MODES:
        raise ValueError(f"genrm.mode must be one of {', '.join(MODES)} (got {mode!r})")
    if mode == "all_pairs":
        return list(combinations(range(n), 2))
    reach = 1 if mode == "circular" else k
    if isinstance(reach, bool) or not isinstance(reach, int) or reach < 1:
        raise ValueError(f"genrm k_neighbours needs k >= 1 neighbours per rollout (got k={k!r})")
    seen: set[frozenset[int]] = set()
    out: list[tuple[int, int]] = []
    for i in range(n):
        for step in range(1, reach + 1):
            j = (i + step) % n
            edge = frozenset((i, j))
            if i != j and edge not in seen:
                seen.add(edge)
                out.append((i, j))
    return out


def orient(pairs: Sequence[tuple[int, int]], rng: random.Random) -> list[tuple[int, int]]:
    """Each pair swapped with probability 1/2: which response the judge sees first is random."""
    return [(j, i) if rng.random() < 0.5 else (i, j) for i, j in pairs]


def _check(n: int, shown: Sequence[tuple[int, int]], judgements: Sequence[Judgement]) -> None:
    if len(shown) != len(judgements):
        raise ValueError(f"aggregate needs one judgement per shown pair (got {len(shown)} pairs, "
                         f"{len(judgements)} judgements)")
    for i, j in shown:
        if not (0 <= i < n and 0 <= j < n) or i == j:
            raise ValueError(f"shown pair ({i}, {j}) must name two different rollouts in 0..{n - 1}")


def _mean_rewards(n: int, shown: Sequence[tuple[int, int]], judgements: Sequence[Judgement],
                  step: float | None) -> list[float]:
    """Mean per rollout of its (adjusted) scores; ``step=None`` is the reference tie-break."""
    totals, counts = [0.0] * n, [0] * n
    for (i, j), jd in zip(shown, judgements):
        s1, s2 = jd.score_1, jd.score_2
        if step is None:
            shift = RANKING_MIDPOINT - jd.ranking if s1 == s2 else 0.0
        else:
            shift = step * (RANKING_MIDPOINT - jd.ranking)
        totals[i] += s1 + shift
        totals[j] += s2 - shift
        counts[i] += 1
        counts[j] += 1
    return [t / c if c else NEUTRAL_SCORE for t, c in zip(totals, counts)]


def _solve(a: list[list[float]], b: list[float]) -> list[float]:
    """x with a x = b for a symmetric positive definite ``a`` (Gaussian elimination)."""
    n = len(b)
    a = [row[:] + [b[r]] for r, row in enumerate(a)]
    for col in range(n):
        pivot = a[col][col]
        for row in range(col + 1, n):
            factor = a[row][col] / pivot
            if factor:
                for c in range(col, n + 1):
                    a[row][c] -= factor * a[col][c]
    x = [0.0] * n
    for row in range(n - 1, -1, -1):
        x[row] = (a[row][n] - sum(a[row][c] * x[c] for c in range(row + 1, n))) / a[row][row]
    return x


def _joint_rewards(n: int, shown: Sequence[tuple[int, int]], judgements: Sequence[Judgement]) -> list[float]:
    """Least squares over the comparison graph: rewards u minimising, over parsed judgements,
    (u_i - score_1)^2 + (u_j - score_2)^2 + JOINT_WEIGHT * (u_i - u_j - JOINT_STEP * (3.5 - ranking))^2.
    """
    a = [[_RIDGE if r == c else 0.0 for c in range(n)] for r in range(n)]
    b = [_RIDGE * NEUTRAL_SCORE] * n
    w = JOINT_WEIGHT
    for (i, j), jd in zip(shown, judgements):
        if not jd.parsed:
            continue  # a failure says nothing about either response
        margin = JOINT_STEP * (RANKING_MIDPOINT - jd.ranking)
        a[i][i] += 1.0 + w
        a[j][j] += 1.0 + w
        a[i][j] -= w
        a[j][i] -= w
        b[i] += jd.score_1 + w * margin
        b[j] += jd.score_2 - w * margin
    return _solve(a, b)


def aggregate(n: int, shown: Sequence[tuple[int, int]], judgements: Sequence[Judgement],
              rule: Rule = "margin") -> list[float]:
    """One reward per rollout from judgements of the ``shown`` pairs (first shown = response 1).

    reference: DESIGN.md §1 -- scores as given; only when score_1 == score_2 is (3.5 - ranking)
      added to response 1 and subtracted from response 2; a rollout gets the mean over its
      comparisons (parse failures count as 3 / 3 / 3.5).
    margin (default): every comparison shifts the two scores by +-MARGIN_STEP * (3.5 - ranking),
      then the mean: the ranking refines the coarse 1-5 scores (at most +-0.3125, so it never
      overturns a whole score point) instead of overriding them only on exact ties.
    joint: least squares on the comparison graph (see :func:`_joint_rewards`), failures left out.
    Why margin: ``python bench/genrm_circular.py`` (simulated judge, N=16, 2000 groups) -- Kendall
    tau-b reference -> margin, circular shuffled: 0.716 -> 0.745 (low noise), 0.547 -> 0.559
    (medium), 0.350 -> 0.360 (high); margin beats reference in all 18 mode/order/noise rows
    (+0.010..+0.029 tau, +0.015..+0.08 top-1); joint is never more than 0.001 ahead of it and
    behind it in circular (with ``--offset 0``, scores that do not drift per call, joint leads
    at low noise by up to 0.008). A rollout no comparison mentions gets NEUTRAL_SCORE.
    """
    _check(n, shown, judgements)
    if rule == "reference":
        return _mean_rewards(n, shown, judgements, step=None)
    if rule == "margin":
        return _mean_rewards(n, shown, judgements, step=MARGIN_STEP)
    if rule == "joint":
        return _joint_rewards(n, shown, judgements)
    raise ValueError(f"genrm aggregation rule must be one of {', '.join(RULES)} (got {rule!r})")


def position_bias(shown: Sequence[tuple[int, int]], judgements: Sequence[Judgement]) -> float:
    """Fraction of parsed comparisons in which the judge preferred the response shown first.

    0.5 is an unbiased judge on randomly oriented pairs; NaN when nothing parsed.
    """
    if len(shown) != len(judgements):
        raise ValueError(f"position_bias needs one judgement per shown pair (got {len(shown)} pairs, "
                         f"{len(judgements)} judgements)")
    parsed = [jd for jd in judgements if jd.parsed]
    if not parsed:
        return math.nan
    return sum(jd.ranking < RANKING_MIDPOINT for jd in parsed) / len(parsed)
