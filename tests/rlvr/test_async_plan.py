"""The discrete-event model of synchronous vs bounded-staleness RL on hand-computed cases."""

from __future__ import annotations

import pytest

from posttrain.rlvr.async_plan import Phases, simulate


def test_k0_is_the_synchronous_loop():
    plan = simulate(Phases(gen_s=3, train_s=2, sync_s=1, load_s=0.5), k=0, steps=10)
    # every step: load the new version (not before step 1), generate, train, publish
    assert plan.seconds == pytest.approx(10 * (3 + 2 + 1) + 9 * 0.5)
    assert plan.mean_staleness == 0 and plan.max_staleness == 0


def test_k1_overlaps_generation_with_training_up_to_the_slower_side():
    sync = simulate(Phases(gen_s=2, train_s=2), k=0, steps=100)
    one = simulate(Phases(gen_s=2, train_s=2), k=1, steps=100)
    # overlapped: after the first generation both sides are busy every 2 s
    assert one.seconds == pytest.approx(2 + 100 * 2)
    assert sync.seconds / one.seconds == pytest.approx(400 / 202)
    assert one.max_staleness == 1 and one.trainer_idle == pytest.approx(2 / 202)


def test_staleness_never_exceeds_k_and_a_slow_trainer_bounds_the_speedup():
    for k in (1, 2, 3):
        plan = simulate(Phases(gen_s=1, train_s=4, sync_s=0.5), k=k, steps=50, jitter=0.3, seed=k)
        assert plan.max_staleness <= k
    slow = simulate(Phases(gen_s=1, train_s=4), k=2, steps=100)
    assert slow.seconds == pytest.approx(1 + 100 * 4)  # the trainer never waits after the first batch
    assert slow.engine_idle > 0.7
