"""`posttrain env check` for multi-turn environments, and the registry loading them."""

from __future__ import annotations

import asyncio

import pytest

from posttrain.cli import main
from posttrain.environments.base import Sample, Score, ScoreKind
from posttrain.environments.check import GARBAGE, MALFORMED_CALLS, check_environment, garbage_cases, text_turn
from posttrain.environments.multiturn import Episode, Observation
from posttrain.environments.registry import builtin_names, load_environment
from posttrain.errors import EnvironmentLoadError

SAMPLES = [Sample(id=f"s{i}", messages=[{"role": "user", "content": "say ok"}], answer="ok") for i in range(3)]


class SayOk:
    """A minimal multi-turn plug-in: name, samples, reset, step (no tools, max_turns, gold or hooks)."""

    name = "say_ok"

    def samples(self, split, seed):
        return SAMPLES

    async def reset(self, sample):
        return Episode(sample=sample, messages=list(sample.messages))

    async def step(self, episode, turn):
        if turn.content.strip() == "ok":
            return Observation(done=True, score=Score(1.0))
        return Observation([{"role": "user", "content": "say ok"}])


class WithGold(SayOk):
    max_turns = 2

    def __init__(self, gold=("ok",), reward_garbage=False, crash=False):
        self.gold, self.reward_garbage, self.crash = list(gold), reward_garbage, crash

    def gold_episode(self, sample):
        return self.gold

    async def step(self, episode, turn):
        if self.crash:
            raise RuntimeError("broken env")
        if self.reward_garbage:
            return Observation(done=True, score=Score(1.0))
        return await super().step(episode, turn)


@pytest.mark.parametrize(("name", "options"), [("python_tool", {"size": 4}), ("guess_number", {"size": 4})])
def test_builtins_pass_env_check(name, options):
    env = load_environment(name, **options)
    try:
        report = check_environment(env, n=3)
    finally:
        env.close()
    assert report.ok and report.n_gold == 3, "\n".join(report.lines())
    assert report.n_cases == len(GARBAGE) + len(MALFORMED_CALLS)
    lines = report.lines()
    assert lines[0] == f"environment {name} (multi-turn, at most {env.max_turns} turns): 3 samples, 17 garbage cases each"
    assert lines[1] == "  gold episodes scoring 1.0: 3/3" and lines[2] == "  garbage episodes scoring 0: 51/51"
    assert lines[-1] == "  OK"


def test_a_plugin_gets_the_multiturn_defaults():
    env = load_environment("test_multiturn_check:SayOk")
    assert env.tools == () and env.max_turns == 8 and env.gold_episode(SAMPLES[0]) is None
    env.start(None), env.close()  # the single-turn hooks' defaults too
    assert env.state_dict() == {}
    report = check_environment(env, n=2)
    assert report.ok and report.n_gold == 0 and report.max_turns == 8
    assert "(2 samples carry no gold)" in report.lines()[1]


def test_a_broken_gold_and_rewarded_garbage_fail_the_check():
    report = check_environment(WithGold(gold=["not ok"]), n=2)
    assert not report.ok and len(report.gold_failures) == 2 and report.lines()[-1] == "  FAILED"
    assert "ended after 1 turns" in report.gold_failures[0][1].error
    report = check_environment(WithGold(reward_garbage=True), n=1)
    assert {case for _, case, _ in report.garbage_failures} == set(garbage_cases(WithGold()))


def test_a_crashing_env_is_reported_not_raised():
    report = check_environment(WithGold(crash=True), n=2)
    assert len(report.gold_failures) == 2 and not report.garbage_failures
    assert report.errors[ScoreKind.ENV_ERROR] == 2 * (1 + report.n_cases)


class NoTurns(SayOk):
    max_turns = 0


def test_a_multiturn_plugin_with_a_bad_max_turns_is_refused():
    with pytest.raises(EnvironmentLoadError, match="max_turns must be an integer >= 1"):
        load_environment("test_multiturn_check:NoTurns")


def test_malformed_calls_run_no_tool():
    """Each malformed call is an error the model sees, and the python tool never runs."""
    env = load_environment("python_tool", size=2)
    runs = []

    class Runner:
        async def arun(self, job):
            runs.append(job)
            raise AssertionError("a malformed call ran")

    from posttrain.environments.base import StageResources

    env.start(StageResources(code_runner=Runner()))
    sample = env.samples("train", 0)[0]
    for case, text in garbage_cases(env).items():
        if case not in MALFORMED_CALLS:
            continue
        turn = text_turn(text)

        async def go():
            return await env.step(await env.reset(sample), turn)

        obs = asyncio.run(go())
        assert not obs.done and obs.errors and all(m["content"].startswith("error: ") for m in obs.messages), case
    assert runs == []
    env.close()


def test_cli_checks_and_shows_multiturn_environments(capsys):
    assert {"python_tool", "guess_number", "http"} <= set(builtin_names())
    assert main(["env", "check", "guess_number", "--n", "2"]) == 0
    out = capsys.readouterr().out
    assert "gold episodes scoring 1.0: 2/2" in out and "OK" in out
    assert main(["env", "show", "python_tool", "-o", "size=2", "--n", "1"]) == 0
    out = capsys.readouterr().out
    assert '[tool] {"type": "function", "function": {"name": "python"' in out
    assert "[gold turn 1] <tool_call>" in out and "[gold turn 2] The answer is \\boxed{" in out
    with pytest.raises(EnvironmentLoadError, match="base_url"):
        load_environment("http")
