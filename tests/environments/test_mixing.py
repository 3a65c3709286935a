"""Mixing ratios, the always-solved filter and the easy-to-hard curriculum."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from posttrain.environments.base import Sample, Score
from posttrain.environments.mixing import (CurriculumConfig, EnvSampler, MixedSampler, allocate, env_metrics,
                                           filter_solved, pass_rates_from_scores)


def make_samples(prefix: str, n: int) -> list[Sample]:
    return [Sample(id=f"{prefix}{i}", messages=[{"role": "user", "content": str(i)}]) for i in range(n)]


def test_allocate_is_exact_per_step_within_one():
    rng = random.Random(0)
    weights = {"math": 0.5, "code": 0.3, "ifeval": 0.2}
    for n in (1, 7, 10, 64):
        counts = allocate(weights, n, rng)
        assert sum(counts.values()) == n
        for k, w in weights.items():
            assert abs(counts[k] - n * w) < 1


def test_mixing_ratios_hold_over_many_steps():
    samplers = {k: EnvSampler(make_samples(k, 50), seed=i) for i, k in enumerate(("a", "b", "c"))}
    mixed = MixedSampler(samplers, {"a": 5, "b": 3, "c": 1}, seed=0)
    steps, per_step = 500, 7  # 7 does not split 5:3:1 evenly: remainders are drawn
    totals = Counter(name for _ in range(steps) for name, _ in mixed.next_batch(per_step))
    n = steps * per_step
    for name, share in (("a", 5 / 9), ("b", 3 / 9), ("c", 1 / 9)):
        sd = (n * share * (1 - share)) ** 0.5
        assert abs(totals[name] - n * share) < 3 * sd, (name, totals)


@pytest.mark.parametrize("weights", [{}, {"a": 0}, {"a": -1}])
def test_allocate_rejects_bad_weights(weights):
    with pytest.raises(ValueError, match="weights"):
        allocate(weights, 4, random.Random(0))


def test_uniform_sampling_covers_every_sample_each_epoch():
    sampler = EnvSampler(make_samples("x", 10), seed=3)
    epoch = [s.id for s in sampler.draw(10)]
    assert sorted(epoch) == sorted(f"x{i}" for i in range(10))


def test_filter_drops_always_solved_prompts():
    samples = make_samples("p", 4)
    ids = ["p0"] * 4 + ["p1"] * 4 + ["p2"] * 4
    scores = [Score(1.0)] * 4 + [Score(1.0), Score(0.0), Score(1.0), Score(1.0)] + [Score(0.0)] * 4
    rates = pass_rates_from_scores(ids, scores)
    assert rates == {"p0": 1.0, "p1": 0.75, "p2": 0.0}
    assert [s.id for s in filter_solved(samples, rates)] == ["p1", "p2", "p3"]  # p3 unmeasured: kept
    assert [s.id for s in filter_solved(samples, rates, drop_unsolved=True)] == ["p1", "p3"]


def test_errors_do_not_count_as_passes():
    assert pass_rates_from_scores(["a", "a"], [Score(1.0, error="timeout"), Score(1.0)]) == {"a": 0.5}


def test_curriculum_moves_from_easy_to_hard():
    """Synthetic table: prompt i has pass rate i/99 (p99 easiest)."""
    samples = make_samples("p", 100)
    table = {f"p{i}": i / 99 for i in range(100)}
    sampler = EnvSampler(samples, CurriculumConfig(enabled=True, steps=10), seed=0)
    sampler.update(table)  # the pre-pass measurement; step -> 1
    sampler.pass_rate = dict(table)
    early = [table[s.id] for s in sampler.draw(400)]
    for _ in range(20):
        sampler.update({})
    late = [table[s.id] for s in sampler.draw(400)]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(early) > 0.7 and mean(late) < 0.35, (mean(early), mean(late))


def test_curriculum_updates_pass_rates_with_ema():
    sampler = EnvSampler(make_samples("p", 2), CurriculumConfig(enabled=True, ema=0.5))
    sampler.update({"p0": 1.0})
    sampler.update({"p0": 0.0})
    assert sampler.pass_rate == {"p0": 0.5}


def test_state_dict_resumes_the_same_draws():
    def build():
        samplers = {k: EnvSampler(make_samples(k, 9), CurriculumConfig(enabled=k == "b"), seed=1) for k in "ab"}
        return MixedSampler(samplers, {"a": 1, "b": 1}, seed=2)

    a = build()
    for _ in range(3):
        a.next_batch(5)
    a.update("b", {"b1": 0.3})
    state = a.state_dict()
    expected = [[s.id for _, s in a.next_batch(5)] for _ in range(4)]
    b = build()
    b.load_state_dict(state)
    assert [[s.id for _, s in b.next_batch(5)] for _ in range(4)] == expected


def test_env_metrics():
    m = env_metrics("math", [Score(1.0, {"t": 1.0}), Score(0.0, error="timeout"), Score(0.5, {"t": 3.0})])
    assert m["env/math/reward"] == pytest.approx(0.5)
    assert m["env/math/pass_rate"] == pytest.approx(1 / 3)
    assert m["env/math/error_rate"] == pytest.approx(1 / 3)
    assert m["env/math/errors/invalid"] == 1  # an error without a kind is the answer's
    assert m["env/math/t"] == pytest.approx(2.0)


def test_errors_are_counted_by_kind_not_by_their_text():
    from posttrain.environments.base import ScoreKind

    scores = [Score(0.0, error="infra: looked like one, is an answer problem"),  # a plug-in's detail text
              Score(0.0, error="sandbox gone", kind=ScoreKind.INFRA), Score(1.0)]
    m = env_metrics("code", scores)
    assert (m["env/code/errors/invalid"], m["env/code/errors/infra"]) == (1, 1)
    assert m["env/code/error_rate"] == pytest.approx(2 / 3)
    assert pass_rates_from_scores(["a"] * 3, scores) == {"a": pytest.approx(1 / 3)}


def test_curriculum_moves_by_run_progress_when_steps_never_come():
    """A time-capped run (steps: 1000, max_minutes: 8) stops after a few dozen updates: the schedule
    follows the fraction of the run the loop reports, not the step count it will never reach."""
    samples = make_samples("p", 100)
    table = {f"p{i}": i / 99 for i in range(100)}
    samplers = {"m": EnvSampler(samples, CurriculumConfig(enabled=True, steps=1000), seed=0)}
    mixed = MixedSampler(samplers, {"m": 1.0})
    samplers["m"].pass_rate = dict(table)
    for _ in range(30):  # 3% of the steps: by steps alone the target would barely move
        mixed.update("m", {})
    assert samplers["m"].target() > 0.85
    mixed.set_progress(1.0)  # the wall-time budget is used up
    assert samplers["m"].target() == pytest.approx(0.2)
    late = [table[s.id] for _, s in mixed.next_batch(400)]
    assert sum(late) / len(late) < 0.35
    resumed = EnvSampler(samples, CurriculumConfig(enabled=True, steps=1000))
    resumed.load_state_dict(samplers["m"].state_dict())
    assert resumed.target() == pytest.approx(0.2)
    with pytest.raises(ValueError, match="finite"):
        mixed.set_progress(float("nan"))
