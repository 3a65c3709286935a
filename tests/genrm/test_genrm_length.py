"""Group-relative length control, against hand-worked values."""

from __future__ import annotations

import random

import pytest

from posttrain.genrm.length_control import LengthControl, apply_length_control, relative_shortness

NO_BONUS = LengthControl(short_bonus=0.0)
BONUS_ONLY = LengthControl(reasoning_coef=0.0, answer_coef=0.0)


def close(a: list[float], b: list[float], tol: float = 1e-9) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= tol for x, y in zip(a, b))


def test_defaults_are_the_reference_coefficients():
    cfg = LengthControl()
    assert (cfg.reasoning_coef, cfg.answer_coef, cfg.short_bonus, cfg.top_fraction) == (0.3, 0.35, 0.5, 0.2)


def test_hand_worked_three():
    # reasoning [0, 50, 100]: shortness [1, .5, 0] - .5 -> [.5, 0, -.5] * 0.3 = [.15, 0, -.15]
    # answer [10, 10, 40]: [1, 1, 0] - 2/3 -> [1/3, 1/3, -2/3] * 0.35
    # top 20% of 3 -> the single best (reward 5, index 2) is the only candidate: +0.5
    got = apply_length_control([4.0, 3.0, 5.0], [0, 50, 100], [10, 10, 40], LengthControl())
    assert close(got, [4.0 + 0.15 + 0.35 / 3, 3.0 + 0.35 / 3, 5.0 - 0.15 - 0.7 / 3 + 0.5])


def test_relative_shortness_hand_worked():
    assert close(relative_shortness([10, 20, 30, 40]), [0.5, 1 / 6, -1 / 6, -0.5])


def test_penalties_sum_to_zero_in_a_group():
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(2, 32)
        rewards = [rng.uniform(1, 5) for _ in range(n)]
        reasoning = [rng.randint(0, 8000) for _ in range(n)]
        answer = [rng.randint(1, 2000) for _ in range(n)]
        got = apply_length_control(rewards, reasoning, answer, NO_BONUS)
        assert abs(sum(got) - sum(rewards)) < 1e-9


def test_all_equal_lengths_leave_rewards_unchanged():
    rewards = [4.0, 2.5, 3.0, 5.0, 1.0]
    assert apply_length_control(rewards, [300] * 5, [120] * 5, LengthControl()) == rewards


def test_one_rollout_is_unchanged():
    assert apply_length_control([4.2], [1000], [10], LengthControl()) == [4.2]


def test_two_rollouts_both_scopes():
    # reasoning [10, 30]: [.5, -.5] * .3; answers equal; top 1 of 2 = index 1 (reward 2), also the shortest of the top
    assert close(apply_length_control([1.0, 2.0], [10, 30], [5, 5], LengthControl()), [1.15, 2.35])
    # group scope: the group's shortest (index 0) is not in the top -> no bonus
    group = LengthControl(bonus_scope="group")
    assert close(apply_length_control([1.0, 2.0], [10, 30], [5, 5], group), [1.15, 1.85])


def test_bonus_goes_to_the_shortest_of_the_top_fifth_of_sixteen():
    rewards = [float(16 - i) for i in range(16)]  # index 0 best; top 20% of 16 = 3 (indices 0, 1, 2)
    answer = [500, 300, 400] + [100] * 13  # index 3.. are shorter but not top
    got = apply_length_control(rewards, [0] * 16, answer, BONUS_ONLY)
    assert got == [16.0, 15.5] + rewards[2:]
    group = apply_length_control(rewards, [0] * 16, answer, LengthControl(0.0, 0.0, bonus_scope="group"))
    assert group == rewards  # the group's shortest are not among the top


def test_top_fifth_rounds_down_but_keeps_one():
    rewards = [8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]  # 20% of 8 = 1.6 -> only the best is eligible
    got = apply_length_control(rewards, [0] * 8, [90, 50, 70, 70, 70, 70, 70, 70], BONUS_ONLY)
    assert got == [8.5] + rewards[1:]


def test_ties_share_the_bonus():
    rewards = [5.0, 5.0, 1.0, 1.0, 1.0]  # top 20% of 5 = 1, the tie at the cut brings in both 5s
    got = apply_length_control(rewards, [0] * 5, [10, 10, 50, 5, 20], BONUS_ONLY)
    assert got == [5.25, 5.25, 1.0, 1.0, 1.0]


def test_an_empty_answer_never_earns_the_bonus():
    assert apply_length_control([5.0, 1.0, 1.0], [10, 10, 10], [0, 10, 20], BONUS_ONLY) == [5.0, 1.0, 1.0]


def test_zero_coefficients_turn_everything_off():
    off = LengthControl(0.0, 0.0, 0.0)
    assert apply_length_control([1.0, 4.0, 2.0], [1, 900, 40], [3, 700, 2], off) == [1.0, 4.0, 2.0]


@pytest.mark.parametrize("kwargs, match", [
    ({"reasoning_coef": -0.1}, "reasoning_coef must be >= 0"),
    ({"short_bonus": float("nan")}, "short_bonus must be >= 0"),
    ({"top_fraction": 0.0}, r"top_fraction must be in \(0, 1\]"),
    ({"top_fraction": 1.5}, "top_fraction"),
    ({"bonus_scope": "all"}, "bonus_scope must be top or group"),
])
def test_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LengthControl(**kwargs)


def test_length_mismatch_error():
    with pytest.raises(ValueError, match="one reasoning and one answer length per reward"):
        apply_length_control([1.0, 2.0], [1], [1, 2], LengthControl())
