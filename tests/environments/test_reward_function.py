"""The reward_function environment: a dataset plus module:function rewards, no class to write."""

from __future__ import annotations

import asyncio
import json
import sys

import pytest

from posttrain.environments.base import ScoreKind, score_safely
from posttrain.environments.registry import load_environment
from posttrain.errors import DataError, EnvironmentLoadError

REWARDS = '''
import asyncio
import time


def exact(completion, answer):
    return completion.strip() == str(answer)


async def brevity(completion, **row):
    assert row["topic"] in ("a", "b")  # every column arrives by name
    return 1.0 if len(completion) <= 3 else 0.25


def crash(completion):
    raise RuntimeError("bad reward code")


def slow(completion):
    time.sleep(5)
    return 1.0


def junk(completion):
    return "yes"
'''


@pytest.fixture
def data(tmp_path, monkeypatch):
    (tmp_path / "fixture_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    rows = [{"prompt": f"Say {i}.", "answer": i, "topic": "ab"[i % 2]} for i in range(9)]
    rows.append({"prompt": [{"role": "user", "content": "Say 9."}], "answer": 9, "topic": "b"})
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _score(env, sample, text):
    return asyncio.run(score_safely(env, sample, text))


def test_rewards_are_the_weighted_mean_with_each_function_logged(data):
    env = load_environment("reward_function", dataset=data,
                           rewards=["fixture_rewards:exact", {"function": "fixture_rewards:brevity", "weight": 3}])
    train, test = env.samples("train", 0), env.samples("test", 0)
    assert (len(train), len(test)) == (9, 1)  # test_fraction 0.1: the last row
    assert test[0].messages == [{"role": "user", "content": "Say 9."}]  # chat-shaped prompts kept as given
    right, wrong = _score(env, train[4], "4"), _score(env, train[4], "four")
    assert (right.reward, right.metrics) == (1.0, {"reward_exact": 1.0, "reward_brevity": 1.0})
    assert wrong.reward == pytest.approx(3 * 0.25 / 4) and wrong.kind is ScoreKind.OK


@pytest.mark.parametrize(("function", "error"), [("crash", "crash: RuntimeError: bad reward code"),
                                                  ("slow", "slow: timeout: no reward within 0.2s"),
                                                  ("junk", "junk: returned str 'yes', not a finite number")])
def test_a_failing_function_scores_zero_as_an_environment_error(data, function, error):
    env = load_environment("reward_function", dataset=data, timeout_s=0.2,
                           rewards=["fixture_rewards:exact", f"fixture_rewards:{function}"])
    score = _score(env, env.samples("train", 0)[1], "1")
    assert (score.reward, score.kind, score.error) == (0.0, ScoreKind.ENV_ERROR, error)
    assert score.metrics["reward_exact"] == 1.0


def test_bad_setups_are_named_errors(data, tmp_path):
    with pytest.raises(EnvironmentLoadError, match="rewards: required, not given"):
        load_environment("reward_function", dataset=data)
    with pytest.raises(EnvironmentLoadError, match="'fixture_rewards' has no attribute 'nope'"):
        load_environment("reward_function", dataset=data, rewards=["fixture_rewards:nope"])
    with pytest.raises(EnvironmentLoadError, match="must be module:function"):
        load_environment("reward_function", dataset=data, rewards=["fixture_rewards.exact"])
    with pytest.raises(EnvironmentLoadError, match="rewards.0.weight"):
        load_environment("reward_function", dataset=data, rewards=[{"function": "fixture_rewards:exact", "weight": 0}])
    with pytest.raises(DataError, match="has no column 'question' \(prompt_column\); its columns: prompt, answer, topic"):
        load_environment("reward_function", dataset=data, rewards=["fixture_rewards:exact"],
                         prompt_column="question", on_invalid="error")


def test_a_run_config_trains_on_it(data, tmp_path, capsys):
    from posttrain.cli import main

    assert main(["rlvr", "--dry-run", f"run_dir={tmp_path}/r", "environments=[{name: reward_function, options: "
                 f"{{dataset: {data}, rewards: [fixture_rewards:exact], test_fraction: 0.2}}}}]"]) == 0
    assert "# environment reward_function: ok, 8 train / 2 test samples" in capsys.readouterr().out
    assert "fixture_rewards" in sys.modules
