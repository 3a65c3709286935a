"""A discrete-event model of the RL loop, synchronous or with bounded staleness: what overlapping
generation and training would buy, from measured phase times, before building it (#20).

Two resources: the engines generate (and score) step ``i``'s rollouts, the trainer trains on them and
publishes version ``i`` of the weights. With ``max_staleness = k``, step ``i``'s rollouts may be
sampled with any version >= ``i - 1 - k`` (admission control: generation waits rather than samples
from an older policy; nothing is dropped). ``k = 0`` is today's loop: every step is generate, train,
sync in turn. A new version costs the trainer ``sync_s`` (publishing) and the engines ``load_s``
(taking it between batches: in-flight updates, no drain).
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Phases:
    """Seconds per step: generation + scoring on the engines, the trainer's update, its publishing of
    the weights, and the engines' load of a new version."""

    gen_s: float
    train_s: float
    sync_s: float = 0.0
    load_s: float = 0.0


@dataclass(frozen=True)
class Plan:
    steps: int
    seconds: float  # makespan of all steps
    mean_staleness: float  # versions between the one that sampled a step and the one it trains
    max_staleness: int
    trainer_idle: float  # share of the makespan
    engine_idle: float

    @property
    def steps_per_hour(self) -> float:
        return 3600.0 * self.steps / self.seconds


def simulate(phases: Phases, k: int, steps: int = 200, jitter: float = 0.0, seed: int = 0) -> Plan:
    """Play ``steps`` steps; ``jitter`` (lognormal sigma) varies every phase time independently."""
    if k < 0 or steps < 1:
        raise ValueError("k must be >= 0 and steps >= 1")
    rng = random.Random(seed)

    def draw(seconds: float) -> float:
        return seconds * rng.lognormvariate(0.0, jitter) if jitter and seconds else seconds

    published = [0.0]  # published[v]: when version v is on the engines' side (v = 0: the start)
    engine_free = trainer_free = 0.0
    loaded, staleness, busy_train, busy_engine = 0, [], 0.0, 0.0
    for i in range(1, steps + 1):
        need = max(0, i - 1 - k)  # the oldest version step i may be sampled with
        start = max(engine_free, published[need])
        newest = max(v for v, t in enumerate(published) if t <= start)  # engines take the newest they have
        load = draw(phases.load_s) if newest != loaded else 0.0
        loaded = newest
        gen = draw(phases.gen_s)
        engine_free = start + load + gen
        busy_engine += load + gen
        staleness.append(i - 1 - newest)
        train, sync = draw(phases.train_s), draw(phases.sync_s)
        trainer_free = max(trainer_free, engine_free) + train + sync
        busy_train += train + sync
        published.append(trainer_free)
    makespan = trainer_free
    return Plan(steps, makespan, sum(staleness) / steps, max(staleness), 1 - busy_train / makespan,
                1 - busy_engine / makespan)
