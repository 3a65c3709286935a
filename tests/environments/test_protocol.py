"""score_safely / score_batch: a misbehaving environment never crashes or hangs a step."""

from __future__ import annotations

import asyncio
import math

import pytest

from posttrain.environments.base import Sample, Score, ScoreKind, score_batch, score_safely

SAMPLE = Sample(id="s", messages=[{"role": "user", "content": "q"}], answer="a")


class Env:
    name = "fake"

    def __init__(self, behaviour):
        self.behaviour = behaviour

    def samples(self, split, seed):
        return [SAMPLE]

    async def score(self, sample, completion):
        return await self.behaviour(completion)


async def crash(_):
    raise KeyError("bug in env")


async def hang(_):
    await asyncio.sleep(3600)


def returns(value):
    async def fn(_):
        return value
    return fn


@pytest.mark.parametrize(
    ("behaviour", "detail"),
    [
        (crash, "crash: KeyError"),
        (returns(0.7), "score() returned a float"),
        (returns(Score(math.nan)), "bad reward"),
        (returns(Score(math.inf)), "bad reward"),
        (returns(Score("1")), "bad reward"),  # type: ignore[arg-type]
        (returns(Score(True)), "bad reward"),  # type: ignore[arg-type]
    ],
)
def test_failures_become_zero_with_an_error(behaviour, detail):
    score = asyncio.run(score_safely(Env(behaviour), SAMPLE, "x"))
    assert score.reward == 0.0 and score.kind == ScoreKind.ENV_ERROR and score.error.startswith(detail)


def test_timeout_is_bounded():
    score = asyncio.run(score_safely(Env(hang), SAMPLE, "x", timeout=0.2))
    assert (score.reward, score.kind) == (0.0, ScoreKind.ENV_ERROR) and score.error.startswith("timeout")


@pytest.mark.parametrize("completion", [None, 3, b"bytes", ["list"]])
def test_non_string_completion(completion):
    score = asyncio.run(score_safely(Env(returns(Score(1.0))), SAMPLE, completion))
    assert score.reward == 0.0 and score.kind == ScoreKind.INFRA


def test_reward_clipped_to_unit_interval():
    assert asyncio.run(score_safely(Env(returns(Score(5.0))), SAMPLE, "x")).reward == 1.0
    assert asyncio.run(score_safely(Env(returns(Score(-2.0))), SAMPLE, "x")).reward == 0.0


def test_batch_keeps_order_and_bounds_concurrency():
    running, peak = 0, 0

    async def slow(completion):
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        return Score(float(completion))

    scores = asyncio.run(score_batch(Env(slow), [SAMPLE] * 20, [str(i % 2) for i in range(20)], concurrency=3))
    assert [s.reward for s in scores] == [float(i % 2) for i in range(20)]
    assert peak == 3


def test_batch_length_mismatch():
    with pytest.raises(ValueError, match="2 samples but 1 completions"):
        asyncio.run(score_batch(Env(crash), [SAMPLE, SAMPLE], ["x"]))


@pytest.mark.parametrize(
    ("behaviour", "completion", "kind"),
    [
        (crash, "x", "env_error"),
        (hang, "x", "env_error"),
        (returns(0.7), "x", "env_error"),
        (returns(Score(math.nan)), "x", "env_error"),
        (returns(Score(1.0)), None, "infra"),  # the loop handed over no text: nothing was judged
        (returns(Score(0.0, error="no final answer")), "x", "invalid"),  # a plug-in's error without a kind
        (returns(Score(0.0, error="sandbox down", kind=ScoreKind.INFRA)), "x", "infra"),
        (returns(Score(0.4)), "x", "ok"),
    ],
)
def test_every_score_has_a_typed_kind(behaviour, completion, kind):
    """What went wrong is a kind (ok | invalid | env_error | infra), decided where the score is made;
    the error text is only the detail."""
    score = asyncio.run(score_safely(Env(behaviour), SAMPLE, completion, timeout=0.2))
    assert score.kind == kind and isinstance(score.kind, ScoreKind)
    assert score.kind.trained is (kind != "infra")  # an env_error is trained at reward 0
