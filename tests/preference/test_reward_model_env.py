"""The `reward_model` environment: group-normalised rewards, the reference comparison of a held-out
rollout, outages counted per rollout; and two RLHF steps through real actors (rollout-0, reward_model-0)."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest

from posttrain.environments.base import Completion, Sample, ScoreKind

CONFIGS = Path(__file__).parents[2] / "configs"


def env_with(scorer):
    from posttrain.preference.reward_model_env import RewardModelEnv

    return RewardModelEnv(scorer=scorer, model="unused")


def by_length(convs):  # a stand-in reward model: longer answers score higher
    return [float(len(c[-1]["content"])) for c in convs]


def test_group_rewards_are_the_sigmoid_of_the_z_score_within_the_group():
    env = env_with(by_length)
    sample = Sample("s", [{"role": "user", "content": "q"}], {"reference": "ref"})
    scores = asyncio.run(env.score_groups([sample, sample], [[Completion("a"), Completion("abc")],
                                                             [Completion("x"), Completion("x")]]))
    s = 1 / (1 + math.exp(-1))  # two scores: z = -1, +1
    assert [round(x.reward, 6) for x in scores[0]] == [round(1 - s, 6), round(s, 6)]
    assert [x.reward for x in scores[1]] == [0.5, 0.5]  # a flat group carries no signal
    assert scores[0][1].metrics["score"] == 3.0 and all(x.kind == ScoreKind.OK for g in scores for x in g)


def test_a_held_out_rollout_is_compared_with_the_reference():
    env = env_with(by_length)
    sample = Sample("s", [{"role": "user", "content": "q"}], {"reference": "abc"})
    win, tie, loss = (asyncio.run(env.score(sample, a)) for a in ("abcd", "xyz", "a"))
    assert (win.reward, tie.reward, loss.reward) == (1.0, 0.5, 0.0)
    assert win.metrics["reference_margin"] == 1.0
    bare = asyncio.run(env.score(Sample("t", [{"role": "user", "content": "q"}]), "a"))
    assert bare.kind == ScoreKind.ENV_ERROR and "no reference" in (bare.error or "")


@pytest.mark.parametrize("scorer", [lambda convs: 1 / 0, lambda convs: [1.0], lambda convs: [float("nan")] * len(convs)])
def test_a_failing_reward_model_scores_infra_errors_never_a_crash(scorer):
    env = env_with(scorer)
    sample = Sample("s", [{"role": "user", "content": "q"}], {"reference": "r"})
    scores = asyncio.run(env.score_groups([sample], [[Completion("a"), Completion("b")]]))
    assert all(s.kind == ScoreKind.INFRA and not s.kind.trained for s in scores[0])
    assert "reward model call failed" in (scores[0][0].error or "")


def test_options_are_checked_and_listed():
    from posttrain.environments.options import describe_options
    from posttrain.environments.registry import EnvironmentLoadError, find_class, load_environment

    with pytest.raises(EnvironmentLoadError, match="model"):
        load_environment("reward_model")
    with pytest.raises(EnvironmentLoadError, match="did you mean 'normalize'"):
        load_environment("reward_model", model="m", normalise="group")
    listed = "\n".join(describe_options(find_class("reward_model")))
    assert "normalize" in listed and "cpus" in listed


def test_two_rlhf_steps_with_a_reward_model_actor_mixed_with_math(tmp_path, tiny_llama_dir):
    from posttrain.config import load_config
    from posttrain.genrm.config import RLHFConfig
    from posttrain.orchestration import cluster
    from posttrain.rlvr.loop import main

    cfg = load_config(RLHFConfig, CONFIGS / "rlhf" / "tiny_reward_model.yaml",
                      [f"run_dir={tmp_path}", "run.dashboard=false"])
    try:
        last = main(cfg, stage="rlhf")
    finally:
        cluster.shutdown_ray()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "env/reward_model/score" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(0.0 <= r["env/reward_model/reward"] <= 1.0 for r in steps)
    assert last["env/reward_model/error_rate"] == 0.0 and "env/math/error_rate" in last  # math: a random model's
    assert len({r["env/reward_model/score"] for r in steps}) == 2  # the RM actor scored each step's rollouts
    assert (tmp_path / "checkpoints" / "step-00000002").is_dir()


def test_env_show_lists_the_options_even_when_a_required_one_is_missing(capsys):
    from posttrain.cli import main

    assert main(["env", "show", "reward_model"]) == 2
    captured = capsys.readouterr()
    assert "normalize: Literal['group', 'none'] = \"group\"" in captured.out
    assert "model: required, not given" in captured.err
