"""The producer of asynchronous RL: admission control bounds the staleness, steps come in order,
nothing finished is dropped, errors reach the controller, pauses leave nothing in flight."""

from __future__ import annotations

import threading
import time

import pytest

from posttrain.rlvr.async_rollouts import RolloutProducer, staleness_metrics
from posttrain.rollout.types import Rollout


class Weights:
    """The version the engines hold (the controller's updates), and what each produced step saw."""

    def __init__(self) -> None:
        self.version = 0
        self.seen: dict[int, int] = {}
        self.running = 0
        self.max_running = 0
        self.lock = threading.Lock()

    def produce(self, step: int, seconds: float = 0.01) -> int:
        with self.lock:
            self.running += 1
            self.max_running = max(self.max_running, self.running)
            self.seen[step] = self.version
        time.sleep(seconds)
        with self.lock:
            self.running -= 1
        return step


def drive(k: int, steps: int, train_s: float = 0.02, gen_s: float = 0.01) -> tuple[Weights, list[int]]:
    """The controller's loop: take step s, 'train' (one update), finished(s)."""
    weights = Weights()
    producer = RolloutProducer(lambda s: weights.produce(s, gen_s), k, 0, steps)
    lags, taken = [], []
    try:
        for step in range(steps):
            taken.append(producer.take(step))
            lags.append(weights.version - weights.seen[step])
            time.sleep(train_s)
            weights.version += 1  # the update, synced to the engines
            producer.finished(step)
    finally:
        producer.close()
    assert taken == list(range(steps))  # oldest first, none dropped, none twice
    return weights, lags


@pytest.mark.parametrize("k", [1, 2, 3])
def test_staleness_never_exceeds_k_and_reaches_it_when_training_is_the_bottleneck(k):
    weights, lags = drive(k, steps=10, train_s=0.1, gen_s=0.005)
    assert max(lags) == k and min(lags) == 0  # the first step is fresh
    assert lags[k:] == [k] * (10 - k)  # generation is fast: every later step was sampled k updates back
    assert weights.max_running == 1  # one producer: steps are generated one after another


def test_when_generation_is_the_bottleneck_the_trainer_waits_and_lags_stay_low():
    _, lags = drive(2, steps=8, train_s=0.0, gen_s=0.03)
    assert max(lags) <= 1  # the producer runs ahead only while the trainer is busy


def test_an_error_while_producing_reaches_the_controller_at_that_step():
    def produce(step):
        if step == 2:
            raise RuntimeError("engine exploded")
        return step

    producer = RolloutProducer(produce, 1, 0, 5)
    try:
        assert producer.take(0) == 0
        producer.finished(0)
        assert producer.take(1) == 1
        producer.finished(1)
        with pytest.raises(RuntimeError, match="engine exploded"):
            producer.take(2)
    finally:
        producer.close()


def test_paused_waits_for_the_step_in_flight_and_admits_none_meanwhile():
    weights = Weights()
    producer = RolloutProducer(lambda s: weights.produce(s, 0.05), 2, 0, 10)
    try:
        assert producer.take(0) == 0
        with producer.paused():
            assert weights.running == 0
            frozen = dict(weights.seen)
            time.sleep(0.1)
            assert weights.seen == frozen  # nothing started while paused
        producer.finished(0)
        assert producer.take(1) == 1
    finally:
        producer.close()


def test_close_returns_with_a_step_in_flight_and_a_resume_starts_where_asked():
    producer = RolloutProducer(lambda s: time.sleep(0.05) or s, 1, 3, 10)  # resumed at step 3
    assert producer.take(3) == 3
    producer.close()  # step 4 may be in flight: close waits for it, and it is never handed out
    assert 0.0 <= producer.metrics()["async/engine_idle_share"] <= 1.0


def test_k_zero_is_refused_it_is_the_synchronous_loop():
    with pytest.raises(ValueError, match="synchronous"):
        RolloutProducer(lambda s: s, 0, 0, 3)


def test_staleness_metrics_by_hand():
    def made(version: int, changes: list[tuple[int, int]] | None = None) -> Rollout:
        return Rollout(0, 0, [1], [2, 3], [-0.1, -0.2], "", "stop", None, "", True, 0, policy_version=version,
                       version_changes=changes or [])

    # the third spans an in-flight update (version 4 from its first token, 5 from its second): its lag is its oldest
    out = staleness_metrics([made(5), made(4), made(4, [(1, 5)]), made(3)], current=5, k=2)
    assert out["async/staleness_mean"] == pytest.approx((0 + 1 + 1 + 2) / 4)
    assert out["async/staleness_max"] == 2
    assert (out["async/staleness_0"], out["async/staleness_1"], out["async/staleness_2"]) == (0.25, 0.5, 0.25)
    assert out["async/spanning_share"] == 0.25


def test_an_async_trainer_keeps_to_the_cores_after_the_engines(monkeypatch, caplog):
    from posttrain.config import load_config
    from posttrain.rlvr.async_rollouts import trainer_cores
    from posttrain.rlvr.config import RLVRConfig

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    cfg = load_config(RLVRConfig, overrides=["run.max_staleness=1", "rollout.num_engines=2",
                                             "rollout.threads_per_engine=2", "train.threads=2", "train.workers=2"])
    assert [trainer_cores(cfg, rank) for rank in (0, 1)] == [[4, 5], [6, 7]]  # engines hold 0-3
    assert trainer_cores(cfg.model_copy(update={"run": cfg.run.model_copy(update={"max_staleness": 0})}), 0) is None
    assert trainer_cores(cfg.model_copy(update={"train": cfg.train.model_copy(update={"num_gpus": 1})}), 0) is None
    monkeypatch.setattr("os.cpu_count", lambda: 4)
    with caplog.at_level("WARNING"):
        assert trainer_cores(cfg, 0) == [0, 1]  # too few cores: shared, and said
    assert "share some" in caplog.text
