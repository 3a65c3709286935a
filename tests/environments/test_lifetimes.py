"""Environment hooks and lifetimes: every environment has the whole protocol (defaults for what
it leaves out), and whoever opens environments closes them -- also on error -- so no math
checker process outlives its stage."""

from __future__ import annotations

import asyncio

import pytest

from posttrain.environments.base import DefaultHooks, Environment, Sample, Score, StageResources, score_safely
from posttrain.environments.registry import EnvConfig, load_environment, opened


class BareEnv:
    """A plug-in with only the required part of the protocol."""

    name = "bare"

    def samples(self, split, seed):
        return [Sample(f"{split}/0", [{"role": "user", "content": "hi"}], answer="hi")]

    async def score(self, sample, completion):
        return Score(float(completion == sample.answer))


def test_a_plugin_gets_the_default_hooks():
    env = load_environment(f"{__name__}:BareEnv")
    assert isinstance(env, Environment)
    assert (env.sandboxed, env.eval_metrics, env.roles(), env.state_dict()) == (False, (), {}, {})
    assert env.gold_answer(env.samples("train", 0)[0]) == "hi"
    env.start(StageResources())
    env.load_state_dict({})
    env.close()
    env.close()  # closing twice is fine


@pytest.mark.parametrize("name", ["math", "code", "instruction_following", "json_schema", "reasoning_gym",
                                  "genrm_preference", "genrm"])
def test_builtins_implement_the_whole_protocol(name):
    options = {"genrm": {"judge": {"model": "stub"}}, "reasoning_gym": {"tasks": ["leg_counting"]}}.get(name, {})
    env = load_environment(name, **options)
    assert isinstance(env, DefaultHooks) and isinstance(env, Environment)


async def score_all(env, sample, n=4):
    return await asyncio.gather(*(score_safely(env, sample, "\\boxed{1}") for _ in range(n)))


def test_opened_environments_are_closed_even_on_error(math_checkers):
    with pytest.raises(RuntimeError, match="mid-stage"):
        with opened([EnvConfig(name="math", options={"size": 4, "workers": 2})]) as envs:
            sample = envs["math"].samples("train", 0)[0]
            scores = asyncio.run(score_all(envs["math"], sample))
            assert all(s.kind == "ok" for s in scores) and len(math_checkers()) == 2
            raise RuntimeError("mid-stage failure")
    assert math_checkers() == []


def test_opened_closes_what_it_loaded_when_a_later_one_fails(math_checkers, monkeypatch):
    from posttrain.environments.math_env import MathEnv

    closed = []
    monkeypatch.setattr(MathEnv, "close", lambda self: closed.append(self))
    with pytest.raises(Exception, match="unknown environment"):
        with opened([EnvConfig(name="math"), EnvConfig(name="no_such_env")]):
            pass
    assert len(closed) == 1


def test_math_checker_pool_close_kills_every_worker(math_checkers):
    from posttrain.verifiers.math import MathCheckerPool

    pool = MathCheckerPool(size=2)
    results = [pool.check("\\boxed{2}", "2"), pool.check("\\boxed{3}", "2")]
    assert [r.kind for r in results] == ["correct", "wrong_answer"] and math_checkers()
    pool.close()
    assert math_checkers() == []
    assert pool.check("\\boxed{2}", "2").correct  # usable again: starts a new worker
    pool.close()
    assert math_checkers() == []


def test_math_checkers_live_across_event_loops_until_closed(math_checkers):
    """The RL loop runs one event loop per step: a checker must outlive it (a worker dies with the
    thread that started it, so checks on a step's borrowed threads restarted it every step)."""
    with opened([EnvConfig(name="math", options={"size": 4, "workers": 1})]) as envs:
        sample = envs["math"].samples("train", 0)[0]
        asyncio.run(score_all(envs["math"], sample, 1))
        first = math_checkers()
        asyncio.run(score_all(envs["math"], sample, 1))
        assert math_checkers() == first and len(first) == 1
    assert math_checkers() == []
