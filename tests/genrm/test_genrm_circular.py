"""Comparison graphs and the aggregation of pairwise judgements, against hand-worked values."""

from __future__ import annotations

import math
import random

import pytest

from posttrain.genrm.circular import RULES, aggregate, orient, pairs, position_bias
from posttrain.genrm.judge_format import FALLBACK, Judgement


def J(s1: float, s2: float, ranking: float) -> Judgement:
    return Judgement(float(s1), float(s2), float(ranking), parsed=True)


def close(a: list[float], b: list[float], tol: float = 1e-5) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b))


# ------------------------------------------------------------------------------- pairs()

def test_pair_counts_for_sixteen():
    assert len(pairs(16, "circular")) == 16
    assert len(pairs(16, "all_pairs")) == 120
    assert len(pairs(16, "k_neighbours", k=2)) == 32


def test_pairs_exact():
    assert pairs(4, "circular") == [(0, 1), (1, 2), (2, 3), (3, 0)]
    assert pairs(3, "all_pairs") == [(0, 1), (0, 2), (1, 2)]
    assert pairs(5, "k_neighbours", k=2) == [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3), (2, 4), (3, 4), (3, 0),
                                              (4, 0), (4, 1)]


def test_two_rollouts_are_one_comparison_in_every_mode():
    for mode in ("circular", "all_pairs", "k_neighbours"):
        assert pairs(2, mode) == [(0, 1)]


def test_k_neighbours_never_repeats_a_pair():
    assert pairs(4, "k_neighbours", k=2) == [(0, 1), (0, 2), (1, 2), (1, 3), (2, 3), (3, 0)]  # = all 6 pairs
    assert len(pairs(3, "k_neighbours", k=5)) == 3
    assert pairs(7, "k_neighbours", k=1) == pairs(7, "circular")


@pytest.mark.parametrize("n, mode, k, match", [
    (1, "circular", 2, "n >= 2"), (0, "all_pairs", 2, "n >= 2"), (True, "circular", 2, "n >= 2"),
    (4, "ring", 2, "one of circular, all_pairs, k_neighbours"), (4, "k_neighbours", 0, "k >= 1"),
])
def test_pairs_errors(n, mode, k, match):
    with pytest.raises(ValueError, match=match):
        pairs(n, mode, k=k)


def test_orient_swaps_about_half_and_keeps_the_pairs():
    base = pairs(40, "all_pairs")  # 780 pairs
    shown = orient(base, random.Random(0))
    assert shown == orient(base, random.Random(0))  # seeded
    assert [frozenset(p) for p in shown] == [frozenset(p) for p in base]
    swapped = sum(s != b for s, b in zip(shown, base))
    assert 300 < swapped < 480


# --------------------------------------------------------------------------- aggregate()

def test_reference_hand_worked_three():
    shown = [(0, 1), (1, 2), (2, 0)]
    judgements = [J(4, 2, 2), J(3, 3, 2), J(5, 3, 5)]  # only the middle one is a tie: +-1.5
    assert aggregate(3, shown, judgements, rule="reference") == [3.5, 3.25, 3.25]


def test_margin_hand_worked_three():
    # shift 0.125 * (3.5 - ranking): +0.1875, +0.1875, -0.1875
    shown = [(0, 1), (1, 2), (2, 0)]
    judgements = [J(4, 2, 2), J(3, 3, 2), J(5, 3, 5)]
    assert close(aggregate(3, shown, judgements, rule="margin"), [3.6875, 2.5, 3.8125])


def test_reference_hand_worked_five_odd_circle():
    shown = pairs(5, "circular")
    judgements = [J(4, 4, 3), J(4, 2, 2), J(2, 5, 6), J(5, 3, 1), J(3, 4, 4)]
    assert aggregate(5, shown, judgements, rule="reference") == [4.25, 3.75, 2.0, 5.0, 3.0]


def test_tie_is_split_by_the_ranking_two_rollouts():
    assert aggregate(2, [(0, 1)], [J(3, 3, 1)], rule="reference") == [5.5, 0.5]
    assert aggregate(2, [(0, 1)], [J(3, 3, 6)], rule="reference") == [0.5, 5.5]
    assert aggregate(2, [(0, 1)], [J(4, 2, 6)], rule="reference") == [4.0, 2.0]  # no tie: ranking unused


def test_joint_hand_worked_two():
    # u0 + u1 = 4 + 2; (1 + 2w)(u0 - u1) = (4 - 2) + 2w * 0.5 * (3.5 - 2), w = 0.25 -> u0 - u1 = 2.375 / 1.5
    assert close(aggregate(2, [(0, 1)], [J(4, 2, 2)], rule="joint"), [3.0 + 2.375 / 3, 3.0 - 2.375 / 3])


def test_joint_leaves_failures_out():
    shown = [(0, 1), (1, 2), (2, 0)]
    got = aggregate(3, shown, [J(4, 2, 2), FALLBACK, FALLBACK], rule="joint")
    assert close(got, [3.0 + 2.375 / 3, 3.0 - 2.375 / 3, 3.0])  # rollout 2 has no evidence: neutral 3


@pytest.mark.parametrize("rule", RULES)
def test_parse_failures_give_three_each(rule):
    shown = pairs(4, "circular")
    assert close(aggregate(4, shown, [FALLBACK] * 4, rule=rule), [3.0] * 4, tol=1e-9)


def test_reference_counts_a_failure_as_three():
    got = aggregate(3, [(0, 1), (1, 2), (2, 0)], [J(5, 1, 1), FALLBACK, J(2, 4, 5)], rule="reference")
    assert got == [4.5, 2.0, 2.5]  # r0 = (5 + 4) / 2, r1 = (1 + 3) / 2, r2 = (3 + 2) / 2


def test_unmentioned_rollout_is_neutral():
    assert aggregate(3, [(0, 1)], [J(5, 1, 1)], rule="reference") == [5.0, 1.0, 3.0]


def consistent_judge(quality: list[float]):
    """Scores = rounded quality, ranking from the exact difference; swapping the pair mirrors it."""
    def judge(a: int, b: int) -> Judgement:
        d = quality[a] - quality[b]
        ranking = 1 if d > 1 else 2 if d > 0.4 else 3 if d > 0 else 4 if d > -0.4 else 5 if d > -1 else 6
        return J(min(5, max(1, round(quality[a]))), min(5, max(1, round(quality[b]))), ranking)
    return judge


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("n, mode", [(2, "circular"), (3, "circular"), (5, "circular"), (16, "circular"),
                                     (6, "k_neighbours"), (5, "all_pairs")])
def test_shuffled_orientation_changes_nothing_for_a_consistent_judge(rule, n, mode):
    rng = random.Random(n)
    judge = consistent_judge([rng.uniform(0.6, 5.4) for _ in range(n)])
    base = pairs(n, mode)
    expected = aggregate(n, base, [judge(a, b) for a, b in base], rule=rule)
    for seed in range(5):
        shown = orient(base, random.Random(seed))
        assert close(aggregate(n, shown, [judge(a, b) for a, b in shown], rule=rule), expected, tol=1e-9)


@pytest.mark.parametrize("shown, judgements, match", [
    ([(0, 1)], [], "one judgement per shown pair"),
    ([(0, 3)], [FALLBACK], "two different rollouts in 0..2"),
    ([(1, 1)], [FALLBACK], "two different rollouts"),
])
def test_aggregate_errors(shown, judgements, match):
    with pytest.raises(ValueError, match=match):
        aggregate(3, shown, judgements)


def test_unknown_rule():
    with pytest.raises(ValueError, match="one of reference, margin, joint"):
        aggregate(2, [(0, 1)], [FALLBACK], rule="borda")  # type: ignore[arg-type]


def test_position_bias():
    shown = [(0, 1), (1, 2), (2, 3), (3, 0)]
    assert position_bias(shown, [J(4, 2, 2), J(3, 3, 5), J(2, 2, 3), FALLBACK]) == pytest.approx(2 / 3)
    assert math.isnan(position_bias(shown[:1], [FALLBACK]))
