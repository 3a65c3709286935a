"""reset_safely / step_safely: a misbehaving multi-turn environment ends its episode at reward 0 with a
counted env_error, and never raises or hangs the runner. ToolBox: every tool call gets an answer,
every failure an error message the model sees."""

from __future__ import annotations

import asyncio
import math

import pytest

from posttrain.environments.base import Sample, Score, ScoreKind
from posttrain.environments.multiturn import (MAX_OBSERVATION_CHARS, AssistantTurn, Episode, Observation, ToolCall,
                                              checked_observation, is_multiturn, reset_safely, step_safely)
from posttrain.environments.tools import Tool, ToolBox, ToolError, truncate

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


TOOL = [{"role": "tool", "content": "x"}]


@pytest.mark.parametrize(("obs", "metrics", "errors"), [
    pytest.param(Observation(messages=TOOL, metrics={"big": 10 ** 400, "ok": 1}), {"ok": 1.0}, (), id="huge_int"),
    pytest.param(Observation(messages=TOOL, metrics=[("a", 1)]), {}, (), id="metrics_not_a_dict"),
    pytest.param(Observation(messages=TOOL, errors=7), {}, ("7",), id="errors_not_a_sequence"),
])
def test_junk_observation_fields_are_dropped_not_raised_on(obs, metrics, errors):
    result = step(Env(step=returns(obs)))
    assert not result.done and (result.metrics, result.errors) == (metrics, errors)
    assert checked_observation(obs).messages == TOOL


# --- ToolBox: a turn's tool calls -> tool messages, every failure an error the model sees ---------------

ECHO_SCHEMA = {"type": "object", "properties": {"text": {"type": "string", "maxLength": 100}},
               "required": ["text"], "additionalProperties": False}


async def echo(arguments):
    text = arguments["text"]
    if text == "crash":
        raise KeyError("handler bug")
    if text == "refuse":
        raise ToolError("text must not be 'refuse'")
    if text == "hang":
        await asyncio.sleep(3600)
    if text == "flood":
        return "z" * 10_000
    if text == "bytes":
        return b"not text"
    return text.upper()


def toolbox(**kwargs):
    return ToolBox([Tool("echo", "Echo the text in capitals.", ECHO_SCHEMA, echo)], **{"timeout_s": 0.3, **kwargs})


def calls(*texts, errors=()):
    return AssistantTurn(content="", reasoning=None, tool_call_errors=tuple(errors),
                         tool_calls=tuple(ToolCall("echo", {"text": t}) for t in texts))


@pytest.mark.parametrize(("arguments", "shown"), [
    ({"text": "hi"}, "HI"),
    ({"text": "crash"}, "error: echo failed: KeyError: 'handler bug'"),
    ({"text": "refuse"}, "error: text must not be 'refuse'"),
    ({"text": "hang"}, "error: echo timed out after 0.3s"),
    ({"text": "bytes"}, "error: echo failed: its handler returned a bytes, not text"),
    ({}, "error: bad arguments for echo: 'text' is a required property"),
    ({"text": 5}, "error: bad arguments for echo: at 'text': 5 is not of type 'string'"),
    ({"text": "a" * 101}, "error: bad arguments for echo: at 'text': "),
    ({"text": "hi", "extra": 1}, "error: bad arguments for echo: Additional properties are not allowed"),
    ("not a dict", "error: bad arguments for echo: arguments must be a JSON object, got str"),
])
def test_toolbox_answers_every_call(arguments, shown):
    turn = AssistantTurn(content="", reasoning=None, tool_calls=(ToolCall("echo", arguments),))
    results = asyncio.run(toolbox().run(turn))
    assert results.calls == 1 and len(results.messages) == 1
    assert results.messages[0]["role"] == "tool" and results.messages[0]["name"] == "echo"
    assert results.messages[0]["content"].startswith(shown), results.messages[0]["content"]
    assert len(results.errors) == (0 if shown == "HI" else 1)


def test_toolbox_order_limits_and_malformed_blocks():
    results = asyncio.run(toolbox(max_calls=2).run(calls("a", "b", "c", errors=["unclosed <tool_call>"])))
    assert [m["content"] for m in results.messages] == [
        "error: malformed tool call: unclosed <tool_call>", "A", "B",
        "error: too many tool calls in one turn (at most 2); this one was not run"]
    assert results.calls == 2 and len(results.errors) == 2
    unknown = AssistantTurn(content="", reasoning=None, tool_calls=(ToolCall("x" * 500, {}),))
    (message,) = asyncio.run(toolbox().run(unknown)).messages
    assert message["content"].startswith("error: unknown tool 'xxx") and message["content"].endswith("are: echo")
    assert len(message["name"]) == 64 and len(message["content"]) < 200


def test_toolbox_truncates_a_flood():
    (message,) = asyncio.run(toolbox(max_output_chars=100).run(calls("flood"))).messages
    assert message["content"] == "z" * 100 + "\n... [output truncated: 9900 more characters]"
    assert truncate("short", 100) == "short"


def test_toolbox_survives_hostile_arguments():
    deep: dict = {}
    node = deep
    for _ in range(5000):
        node["text"] = {}
        node = node["text"]
    turn = AssistantTurn(content="", reasoning=None, tool_calls=(ToolCall("echo", deep),))
    (message,) = asyncio.run(toolbox().run(turn)).messages
    assert message["content"].startswith("error: bad arguments for echo")


def test_toolbox_refuses_bad_tools():
    with pytest.raises(ValueError, match="not a valid JSON schema"):
        ToolBox([Tool("t", "", {"type": "no-such-type"}, echo)])
    with pytest.raises(ValueError, match="unique"):
        ToolBox([Tool("t", "", {}, echo), Tool("t", "", {}, echo)])
    assert toolbox().schemas() == [{"type": "function", "function": {
        "name": "echo", "description": "Echo the text in capitals.", "parameters": ECHO_SCHEMA}}]
