"""reset_safely / step_safely: a misbehaving multi-turn environment ends its episode at reward 0 with a
counted env_error, and never raises or hangs the runner."""

from __future__ import annotations

import asyncio
import math

import pytest

from posttrain.environments.base import Sample, Score, ScoreKind
from posttrain.environments.multiturn import (MAX_OBSERVATION_CHARS, AssistantTurn, Episode, Observation,
                                              checked_observation, is_multiturn, reset_safely, step_safely)

SAMPLE = Sample(id="s", messages=[{"role": "user", "content": "q"}], answer="a")
TURN = AssistantTurn(content="hello", reasoning=None)


class Env:
    """A multi-turn environment whose reset and step do what the test says."""

    name = "fake"
    tools = ()
    max_turns = 3

    def __init__(self, reset=None, step=None):
        self._reset, self._step = reset, step

    def samples(self, split, seed):
        return [SAMPLE]

    async def reset(self, sample):
        if self._reset is not None:
            return await self._reset(sample)
        return Episode(sample=sample, messages=list(sample.messages))

    async def step(self, episode, turn):
        return await self._step(turn)


def returns(value):
    async def fn(_):
        return value
    return fn


async def crash(_):
    raise KeyError("bug in env")


async def hang(_):
    await asyncio.sleep(3600)


def step(env, timeout=5.0):
    async def run():
        episode = await reset_safely(env, SAMPLE, timeout)
        assert isinstance(episode, Episode)
        return await step_safely(env, episode, TURN, timeout)
    return asyncio.run(run())


def assert_env_error(obs, detail):
    assert isinstance(obs, Observation) and obs.done and obs.messages == []
    assert (obs.score.reward, obs.score.kind) == (0.0, ScoreKind.ENV_ERROR)
    assert detail in obs.score.error, obs.score.error


def test_is_multiturn():
    assert is_multiturn(Env()) and not is_multiturn(object())


@pytest.mark.parametrize(("reset", "detail"), [
    (crash, "crash in reset(): KeyError"),
    (returns(None), "reset() returned a NoneType"),
    (returns({"messages": []}), "reset() returned a dict"),
    (returns(Score(1.0)), "reset() returned a Score"),
])
def test_reset_failures_end_the_episode(reset, detail):
    score = asyncio.run(reset_safely(Env(reset=reset), SAMPLE, 5.0))
    assert isinstance(score, Score) and (score.reward, score.kind) == (0.0, ScoreKind.ENV_ERROR)
    assert score.error.startswith(detail)


def test_reset_hang_is_bounded():
    score = asyncio.run(reset_safely(Env(reset=hang), SAMPLE, 0.2))
    assert (score.reward, score.kind) == (0.0, ScoreKind.ENV_ERROR) and score.error.startswith("timeout: reset()")


@pytest.mark.parametrize(("behaviour", "detail"), [
    (crash, "crash in step(): KeyError"),
    (returns(None), "step() returned a NoneType"),
    (returns(Score(1.0)), "step() returned a Score"),
    (returns({"role": "user", "content": "x"}), "step() returned a dict"),
    (returns(Observation(messages=[])), "gave no messages"),
    (returns(Observation(messages="higher")), "gave no messages"),
    (returns(Observation(messages=[{"role": "assistant", "content": "I win"}])), "observation message 0"),
    (returns(Observation(messages=[{"role": "system", "content": "new rules"}])), "observation message 0"),
    (returns(Observation(messages=[{"role": "tool", "content": 42}])), "observation message 0"),
    (returns(Observation(messages=[{"role": "tool"}])), "observation message 0"),
    (returns(Observation(messages=[{"role": "user", "content": "ok"}, "tool: 1"])), "observation message 1"),
    (returns(Observation(messages=[{"role": "tool", "content": "x" * (MAX_OBSERVATION_CHARS + 1)}])), "exceeds"),
    (returns(Observation(messages=[{"role": "tool", "content": "x" * 40_000}] * 2)), "exceeds"),
    (returns(Observation(done=True, score=Score(math.nan))), "bad reward"),
    (returns(Observation(done=True, score=Score(math.inf))), "bad reward"),
    (returns(Observation(done=True, score=Score("1"))), "bad reward"),  # type: ignore[arg-type]
    (returns(Observation(done=True, score=Score(True))), "bad reward"),  # type: ignore[arg-type]
    (returns(Observation(done=True, score=0.9)), "score() returned a float"),  # type: ignore[arg-type]
])
def test_step_failures_end_the_episode_at_zero(behaviour, detail):
    assert_env_error(step(Env(step=behaviour)), detail)


def test_step_hang_is_bounded():
    obs = step(Env(step=hang), timeout=0.2)
    assert_env_error(obs, "timeout: step() took over 0.2s")


def test_done_without_score_is_invalid_and_reward_is_clamped():
    obs = step(Env(step=returns(Observation(done=True))))
    assert obs.done and (obs.score.reward, obs.score.kind) == (0.0, ScoreKind.INVALID)
    assert step(Env(step=returns(Observation(done=True, score=Score(7.0))))).score.reward == 1.0
    assert step(Env(step=returns(Observation(done=True, score=Score(-1.0))))).score.reward == 0.0


def test_done_ignores_messages_even_bad_ones():
    obs = step(Env(step=returns(Observation(messages=[{"role": "system", "content": "x"}], done=True,
                                            score=Score(1.0)))))
    assert obs.done and obs.messages == [] and obs.score.reward == 1.0 and obs.score.kind == ScoreKind.OK


def test_metrics_keep_only_finite_numbers():
    metrics = {"calls": 2, "rate": 0.5, "nan": math.nan, "inf": -math.inf, "flag": True, "text": "3",
               "none": None, "list": [1]}
    obs = step(Env(step=returns(Observation(messages=[{"role": "tool", "content": "4"}], metrics=metrics))))
    assert not obs.done and obs.metrics == {"calls": 2.0, "rate": 0.5}
    assert all(type(v) is float for v in obs.metrics.values())


def test_messages_are_copied_down_to_role_content_and_a_text_name():
    messages = [{"role": "tool", "content": "4", "name": "python", "secret": "x"},
                {"role": "user", "content": "higher", "name": 5}]
    obs = step(Env(step=returns(Observation(messages=messages))))
    assert obs.messages == [{"role": "tool", "content": "4", "name": "python"}, {"role": "user", "content": "higher"}]
    assert obs.messages[0] is not messages[0]


def test_errors_are_bounded_text():
    errors = tuple(f"error {i} " + "x" * 1000 for i in range(40))
    obs = step(Env(step=returns(Observation(messages=[{"role": "tool", "content": "ok"}], errors=errors))))
    assert len(obs.errors) == 16 and all(len(e) == 300 for e in obs.errors)
    obs = step(Env(step=returns(Observation(messages=[{"role": "tool", "content": "ok"}], errors=[ValueError("x")]))))
    assert obs.errors == ("x",)


def test_cancellation_is_not_swallowed():
    async def run():
        env = Env(step=hang)
        episode = await reset_safely(env, SAMPLE, 5.0)
        task = asyncio.ensure_future(step_safely(env, episode, TURN, 60.0))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(run())


# Junk that checked_observation itself trips over: reported to the lead (multiturn.py is not ours).
# Until fixed these raise out of step_safely instead of ending the episode; strict xfail flags the fix.
TOOL = [{"role": "tool", "content": "x"}]
JUNK = [
    pytest.param(Observation(messages=TOOL, metrics={"big": 10 ** 400}), id="huge_int_metric"),
    pytest.param(Observation(messages=TOOL, metrics=[("a", 1)]), id="metrics_not_a_dict"),
    pytest.param(Observation(messages=TOOL, errors=7), id="errors_not_iterable"),
]


@pytest.mark.xfail(strict=True, reason="multiturn.checked_observation raises on this junk (fix reported)")
@pytest.mark.parametrize("obs", JUNK)
def test_junk_observation_fields_end_the_episode(obs):
    result = step(Env(step=returns(obs)))
    assert isinstance(result, Observation)


@pytest.mark.parametrize("obs", JUNK)
def test_junk_observation_fields_raise_today(obs):
    """Pins the bug the xfail above describes (delete with the fix)."""
    with pytest.raises((OverflowError, AttributeError, TypeError)):
        checked_observation(obs)
