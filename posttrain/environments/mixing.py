"""Training several environments jointly: fixed ratios per step, solved-prompt filter, curriculum.

As in the reference recipe: all environments share every step in fixed proportions (one at a
time caused regressions); prompts the starting policy always solves are dropped before
training; within an environment, sampling moves from easy to hard by *measured* pass rate.

Everything here is plain Python with an explicit ``random.Random`` so a sampler's state can
be checkpointed (``state_dict``) and a resumed run draws exactly the same prompts.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from posttrain.environments.base import Sample, Score, ScoreKind, restore_rng, rng_state


def allocate(weights: Mapping[str, float], n: int, rng: random.Random) -> dict[str, int]:
    """Split ``n`` prompts by ``weights``: floors, then remainders drawn in proportion.

    Every step is within one prompt of its exact share, and the expected count is exact,
    so ratios hold over many steps with no drift.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0 (got {n})")
    if not weights or any(not w > 0 for w in weights.values()):
        raise ValueError(f"weights must be positive and non-empty (got {dict(weights)})")
    total = sum(weights.values())
    exact = {k: n * w / total for k, w in weights.items()}
    counts = {k: math.floor(v) for k, v in exact.items()}
    left = n - sum(counts.values())
    remainders = {k: exact[k] - counts[k] for k in exact}
    while left > 0:
        keys = [k for k, r in remainders.items() if r > 0]
        pick = rng.choices(keys, weights=[remainders[k] for k in keys])[0]
        counts[pick] += 1
        remainders[pick] = 0.0
        left -= 1
    return counts


def filter_solved(samples: Sequence[Sample], pass_rates: Mapping[str, float], *,
                  max_pass_rate: float = 1.0, drop_unsolved: bool = False) -> list[Sample]:
    """Drop prompts the starting policy always solves (pass rate >= ``max_pass_rate``).

    ``pass_rates`` comes from k samples per prompt (see :func:`pass_rates_from_scores`);
    prompts without a measurement are kept. ``drop_unsolved`` also drops pass rate 0.
    """
    kept = []
    for s in samples:
        rate = pass_rates.get(s.id)
        if rate is not None and (rate >= max_pass_rate or drop_unsolved and rate <= 0.0):
            continue
        kept.append(s)
    return kept


def pass_rates_from_scores(ids: Sequence[str], scores: Sequence[Score], threshold: float = 1.0) -> dict[str, float]:
    """Per-prompt pass rate from a flat list of (id, score) pairs (k per prompt)."""
    hits: dict[str, list[int]] = {}
    for sid, score in zip(ids, scores, strict=True):
        hits.setdefault(sid, []).append(int(score.kind is ScoreKind.OK and score.reward >= threshold))
    return {sid: sum(h) / len(h) for sid, h in hits.items()}


@dataclass
class CurriculumConfig:
    """Easy -> hard by measured pass rate.

    The target pass rate moves linearly from ``start_pass_rate`` to ``end_pass_rate`` as the run
    progresses: over ``steps`` updates, or by the fraction of the run done when the loop says so
    (:meth:`MixedSampler.set_progress`: a run capped by ``max_minutes`` moves by its clock, not by
    a step count it will never reach); a prompt's weight is a Gaussian of (its pass rate - target) with width
    ``width``. Unmeasured prompts count as ``prior`` until scored.
    """

    enabled: bool = False
    start_pass_rate: float = 0.9
    end_pass_rate: float = 0.2
    steps: int = 100
    width: float = 0.2
    prior: float = 0.5
    ema: float = 0.5  # weight of the newest batch when updating a pass rate


class EnvSampler:
    """Draws prompts of one environment; tracks pass rates for the curriculum."""

    def __init__(self, samples: Sequence[Sample], curriculum: CurriculumConfig | None = None,
                 seed: int = 0) -> None:
        if not samples:
            raise ValueError("an environment sampler needs at least one sample")
        self.samples = list(samples)
        self.all_samples = list(samples)  # before keep_only
        self.kept_ids: list[str] | None = None  # keep_only's choice (None: every sample)
        self.curriculum = curriculum or CurriculumConfig()
        self.rng = random.Random(seed)
        self.pass_rate: dict[str, float] = {}
        self.step = 0
        self.progress: float | None = None  # fraction of the run done, when the loop knows it better than steps
        self._order: list[int] = []

    def draw(self, n: int) -> list[Sample]:
        """n prompts: shuffled epochs when uniform; weighted by the curriculum otherwise."""
        if not self.curriculum.enabled:
            out = []
            for _ in range(n):
                if not self._order:
                    self._order = list(range(len(self.samples)))
                    self.rng.shuffle(self._order)
                out.append(self.samples[self._order.pop()])
            return out
        weights = [self.weight(s) for s in self.samples]
        return self.rng.choices(self.samples, weights=weights, k=n)

    def target(self) -> float:
        c = self.curriculum
        progress = self.progress if self.progress is not None else min(1.0, self.step / max(1, c.steps))
        return c.start_pass_rate + (c.end_pass_rate - c.start_pass_rate) * progress

    def weight(self, sample: Sample) -> float:
        c = self.curriculum
        rate = self.pass_rate.get(sample.id, c.prior)
        return math.exp(-((rate - self.target()) ** 2) / (2 * c.width**2)) + 1e-6

    def keep_only(self, ids: Sequence[str]) -> None:
        """Draw from these samples only (the solved filter's survivors); kept in the state."""
        wanted = set(ids)
        kept = [s for s in self.all_samples if s.id in wanted]
        if not kept:
            raise ValueError("keep_only would leave no samples to draw")
        self.samples, self.kept_ids, self._order = kept, [s.id for s in kept], []

    def update(self, pass_rates: Mapping[str, float]) -> None:
        """Fold in the pass rates measured this step; advance the curriculum."""
        a = self.curriculum.ema
        for sid, rate in pass_rates.items():
            old = self.pass_rate.get(sid)
            self.pass_rate[sid] = rate if old is None else (1 - a) * old + a * rate
        self.step += 1

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state(self.rng), "pass_rate": dict(self.pass_rate), "step": self.step,
                "order": list(self._order), "progress": self.progress, "kept_ids": self.kept_ids}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("kept_ids") is not None:  # before the order: it indexes the kept samples
            self.keep_only(state["kept_ids"])
        restore_rng(self.rng, state["rng"])
        self.pass_rate = dict(state["pass_rate"])
        self.step = int(state["step"])
        self._order = list(state["order"])
        self.progress = state.get("progress")  # absent in checkpoints written before it existed


class MixedSampler:
    """Each step: ``prompts_per_step`` prompts split across environments by fixed weights."""

    def __init__(self, samplers: Mapping[str, EnvSampler], weights: Mapping[str, float], seed: int = 0) -> None:
        if set(samplers) != set(weights):
            raise ValueError(f"samplers {sorted(samplers)} and weights {sorted(weights)} differ")
        self.samplers = dict(samplers)
        self.weights = dict(weights)
        self.rng = random.Random(seed)

    def next_batch(self, prompts_per_step: int) -> list[tuple[str, Sample]]:
        counts = allocate(self.weights, prompts_per_step, self.rng)
        return [(name, s) for name, k in counts.items() for s in self.samplers[name].draw(k)]

    def update(self, env_name: str, pass_rates: Mapping[str, float]) -> None:
        self.samplers[env_name].update(pass_rates)

    def set_progress(self, fraction: float) -> None:
        """Tell every curriculum how far the run is (0 = start, 1 = end), e.g. the larger of the
        steps done and the wall-time budget used."""
        if not math.isfinite(fraction):
            raise ValueError(f"progress must be a finite fraction (got {fraction})")
        for sampler in self.samplers.values():
            sampler.progress = min(1.0, max(0.0, fraction))

    def state_dict(self) -> dict[str, Any]:
        return {"rng": rng_state(self.rng), "envs": {k: s.state_dict() for k, s in self.samplers.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        restore_rng(self.rng, state["rng"])
        for name, sub in state["envs"].items():
            self.samplers[name].load_state_dict(sub)


def env_metrics(name: str, scores: Sequence[Score], pass_threshold: float = 1.0) -> dict[str, float]:
    """Per-environment metrics of one step: reward, pass rate, error rate, errors by kind
    (``env/<name>/errors/invalid``, ``.../env_error``, ``.../infra``)."""
    if not scores:
        return {}
    n = len(scores)
    out = {
        f"env/{name}/reward": sum(s.reward for s in scores) / n,
        f"env/{name}/pass_rate": sum(s.kind is ScoreKind.OK and s.reward >= pass_threshold for s in scores) / n,
        f"env/{name}/error_rate": sum(s.kind is not ScoreKind.OK for s in scores) / n,
    }
    for s in scores:
        if s.kind is not ScoreKind.OK:
            key = f"env/{name}/errors/{s.kind}"
            out[key] = out.get(key, 0.0) + 1
    for key in {k for s in scores for k in s.metrics}:
        values = [s.metrics[key] for s in scores if key in s.metrics]
        out[f"env/{name}/{key}"] = sum(values) / len(values)
    return out
