"""The `genrm` environment: one batched judge call per step, circular rewards, eval vs reference.

The judge here is a stub backend (a fake model is fine inside a unit test): it scores a
response by the number written in it, so the expected rewards can be worked out by hand.
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from posttrain.environments.base import Completion, GroupEnvironment, Sample
from posttrain.environments.registry import load_environment
from posttrain.genrm.backends import JudgeCall
from posttrain.genrm.environment import GenRMEnv


class QualityJudge:
    """Reads 'quality N' in each response; ranking 2 / 5 for the better side, 3 on a tie (leans to 1).

    ``neutral_ties`` answers 3.5 on a tie instead (a float ranking: no side preferred)."""

    def __init__(self, broken: set[int] = frozenset(), neutral_ties: bool = False) -> None:
        self.batches: list[int] = []
        self.tie = 3.5 if neutral_ties else 3
        self.broken = broken  # call indices that answer garbage

    def complete(self, batch):
        self.batches.append(len(batch))
        out = []
        for i, conv in enumerate(batch):
            text = conv[-1]["content"]
            q1, q2 = (int(x) for x in re.findall(r"quality (\d)", text)[-2:])
            ranking = 2 if q1 > q2 else 5 if q2 > q1 else self.tie
            verdict = json.dumps({"score_1": q1, "score_2": q2, "ranking": ranking})
            out.append(JudgeCall("no idea" if i in self.broken else f"Thinking done. {verdict}", None, 1, 0.01))
        return out

    def close(self):
        pass


def make_env(judge: QualityJudge, **options) -> GenRMEnv:
    lengths = {"reasoning_coef": 0, "answer_coef": 0, "short_bonus": 0, **options.pop("length_control", {})}
    return GenRMEnv(judge, judge={"model": "stub"}, length_control=lengths, **options)


def sample(i: int, reference: str = "quality 3") -> Sample:
    return Sample(f"s{i}", [{"role": "user", "content": f"question {i}"}], {"reference": reference})


def test_one_batched_call_per_step_and_rewards_follow_quality():
    judge = QualityJudge()
    env = make_env(judge, shuffle=False, rule="reference")
    groups = [[Completion(f"answer quality {q}") for q in (5, 1, 3, 3)], [Completion(f"quality {q}") for q in (2, 4)]]
    scores = asyncio.run(env.score_groups([sample(0), sample(1)], groups))
    assert judge.batches == [4 + 1]  # circular: 4 calls for N=4, one for N=2, all in one batch
    # group 0, pairs (0,1) (1,2) (2,3) (3,0): rollout 0 gets 5 in both -> 5; rollout 1 gets 1, 1 -> 1;
    # rollout 2: 3 (vs 1) and 3 + (3.5 - 3) = 3.5 (tie with rollout 3) -> 3.25; rollout 3: 2.5 and 3 -> 2.75
    raw = [s.metrics["raw_reward"] for s in scores[0]]
    assert raw == pytest.approx([5.0, 1.0, 3.25, 2.75])
    assert [s.reward for s in scores[0]] == pytest.approx([r / 6 for r in raw])  # [0, 6] -> [0, 1]
    assert [s.metrics["raw_reward"] for s in scores[1]] == pytest.approx([2.0, 4.0])
    assert all(s.kind == "ok" and s.metrics["parse_failure_rate"] == 0 for g in scores for s in g)


def test_parse_failures_count_and_score_neutral():
    judge = QualityJudge(broken={0})
    env = make_env(judge, shuffle=False, rule="reference")
    scores = asyncio.run(env.score_groups([sample(0)], [[Completion("quality 5"), Completion("quality 1")]]))[0]
    # N=2 circular is one comparison; it failed -> 3 / 3 -> equal rewards (no gradient), counted
    assert [s.metrics["raw_reward"] for s in scores] == [3.0, 3.0]
    assert scores[0].metrics["parse_failure_rate"] == 1.0 and scores[0].metrics["group_parse_failures"] == 1.0


def test_shuffled_positions_give_the_same_rewards_for_a_consistent_judge():
    groups = [[Completion(f"quality {q}") for q in (4, 2, 5, 1, 3)]]
    plain = asyncio.run(make_env(QualityJudge(), shuffle=False).score_groups([sample(0)], groups))[0]
    shuffled = asyncio.run(make_env(QualityJudge(), shuffle=True, seed=3).score_groups([sample(0)], groups))[0]
    assert [s.reward for s in plain] == pytest.approx([s.reward for s in shuffled])
    assert 0.0 <= shuffled[0].metrics["position1_preference"] <= 1.0


def test_single_rollout_is_judged_against_the_reference():
    env = make_env(QualityJudge(neutral_ties=True), shuffle=True)
    groups = [[Completion("quality 5")], [Completion("quality 1")], [Completion("quality 3")]]
    scores = asyncio.run(env.score_groups([sample(0), sample(1), sample(2)], groups))
    assert [g[0].reward for g in scores] == [1.0, 0.0, 0.5]  # win, loss, tie against "quality 3"
    no_ref = Sample("x", [{"role": "user", "content": "q"}], None)
    assert asyncio.run(env.score_groups([no_ref], [[Completion("quality 5")]]))[0][0].kind == "env_error"


def test_registered_and_validated():
    env = load_environment("genrm", judge={"model": "stub"}, size=5)
    assert isinstance(env, GroupEnvironment) and env.roles() == {"genrm": [{"CPU": 1.0}]}
    assert len(env.samples("train", 0)) == 5 and env.samples("train", 0)[0].answer["reference"]
    with pytest.raises(ValueError, match="judge.model"):
        GenRMEnv()
    with pytest.raises(ValueError, match="rule"):
        GenRMEnv(judge={"model": "m"}, rule="best")


class FirstSideJudge(QualityJudge):
    """Position-biased: adds 2 to the first response's quality and always ranks it 1 ('much better')."""

    def complete(self, batch):
        self.batches.append(len(batch))
        out = []
        for conv in batch:
            q1, q2 = (int(x) for x in re.findall(r"quality (\d)", conv[-1]["content"])[-2:])
            out.append(JudgeCall(json.dumps({"score_1": q1 + 2, "score_2": q2, "ranking": 1}), None, 1, 0.01))
        return out


def test_both_orders_cancels_position_bias_pair_by_pair():
    groups = [[Completion(f"quality {q}") for q in (3, 1, 2)]]
    judge = FirstSideJudge()
    scores = asyncio.run(make_env(judge, both_orders=True).score_groups([sample(0)], groups))[0]
    assert judge.batches == [6]  # circular N=3, each comparison in both orders
    # in (i, j) rollout i gets q_i + 2 + 0.125 * 2.5, in (j, i) it gets q_i - 0.3125: mean q_i + 1
    assert [s.metrics["raw_reward"] for s in scores] == pytest.approx([4.0, 2.0, 3.0])
    assert scores[0].metrics["position1_preference"] == 1.0
    single_judge = FirstSideJudge()
    single = make_env(single_judge, both_orders=True)
    evals = asyncio.run(single.score_groups([sample(0, "quality 1"), sample(1, "quality 3")],
                                            [[Completion("quality 2")], [Completion("quality 2")]]))
    assert [g[0].reward for g in evals] == [1.0, 0.0]  # whichever side is shown first
    assert [g[0].metrics["reference_margin"] for g in evals] == pytest.approx([1.0, -1.0])
    assert single_judge.batches == [4]


def test_rewards_clamped_to_the_range_are_counted():
    """A length bonus can lift a raw reward above the range's top (6): the reward stops at 1 and
    the score says it was clamped, so env/genrm/reward_clamped shows how often that happens."""
    from posttrain.environments.mixing import env_metrics

    env = make_env(QualityJudge(), shuffle=False, length_control={"short_bonus": 4.0, "top_fraction": 0.5})
    group = [Completion("quality 5", answer_tokens=1), Completion("quality 1 " + "padding " * 20, answer_tokens=40)]
    scores = asyncio.run(env.score_groups([sample(0)], [group]))[0]
    assert scores[0].metrics["raw_reward"] > 6 and scores[0].reward == 1.0
    assert [s.metrics["reward_clamped"] for s in scores] == [1.0, 0.0]
    assert env_metrics("genrm", scores)["env/genrm/reward_clamped"] == 0.5


class OutageJudge(QualityJudge):
    """The calls in ``down`` fail as a backend reports an outage (no text, an error code)."""

    def __init__(self, down: set[int]) -> None:
        super().__init__()
        self.down = down

    def complete(self, batch):
        calls = super().complete(batch)
        return [JudgeCall(None, "timeout", 3, 1.0) if i in self.down else c for i, c in enumerate(calls)]


def test_failed_judge_calls_are_counted_infra_errors():
    """A judge call that never came back is not a neutral verdict: the rollouts it compared are
    counted as infra errors (env/genrm/errors/infra, verifier/errors) and not trained."""
    from posttrain.environments.mixing import env_metrics

    env = make_env(OutageJudge(down={0}), shuffle=False, rule="reference")
    scores = asyncio.run(env.score_groups([sample(0)], [[Completion(f"quality {q}") for q in (5, 1, 3, 3)]]))[0]
    assert [s.kind for s in scores] == ["infra", "infra", "ok", "ok"]  # call 0 compared rollouts 0, 1
    assert "judge call failed (timeout)" in scores[0].error
    assert env_metrics("genrm", scores)["env/genrm/errors/infra"] == 2
    single = make_env(OutageJudge(down={0}), shuffle=False)
    assert asyncio.run(single.score_groups([sample(0)], [[Completion("quality 5")]]))[0][0].kind == "infra"


def test_a_step_whose_every_judge_call_failed_says_so(caplog):
    env = make_env(OutageJudge(down=set(range(10))), shuffle=False)
    with caplog.at_level("WARNING", logger="posttrain.genrm.environment"):
        scores = asyncio.run(env.score_groups([sample(0), sample(1)],
                                              [[Completion(f"quality {q}") for q in (5, 1, 3)]] * 2))
    assert all(s.kind == "infra" for g in scores for s in g)
    assert any("every judge call" in r.getMessage() and "timeout" in r.getMessage() for r in caplog.records)


class SeedEchoPool:
    """A stand-in rollout pool: the judge's answer says which seed and which response came first."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, str]] = []

    def generate(self, prompts, gen, n):
        from types import SimpleNamespace

        out = []
        for conv in prompts:
            q1, q2 = (int(x) for x in re.findall(r"quality (\d)", conv[-1]["content"])[-2:])
            self.seen.append((gen.seed, conv[-1]["content"]))
            ranking = 1 + (gen.seed + q1) % 6
            text = json.dumps({"score_1": q1, "score_2": q2, "ranking": ranking})
            out.append([SimpleNamespace(text=text, token_ids=[1], finish_reason="stop", top_tokens=None)])
        return out


def test_environment_state_resumes_the_judge_exactly():
    """The shuffle RNG and the local judge's seed counter are checkpointed: a fresh environment
    loaded with the state judges the next step exactly as the original does."""
    from posttrain.genrm.backends import LocalJudge, judge_generation
    from posttrain.genrm.judge import JudgeConfig

    def env_on(pool):
        return GenRMEnv(LocalJudge(pool, judge_generation(JudgeConfig(model="stub"))), judge={"model": "stub"}, seed=5)

    group = [[Completion(f"quality {q}") for q in (4, 2, 5, 1, 3)]]
    first_pool = SeedEchoPool()
    first = env_on(first_pool)
    asyncio.run(first.score_groups([sample(0)], group))
    state = json.loads(json.dumps(first.state_dict()))  # checkpoints are JSON
    first_pool.seen.clear()
    expected = asyncio.run(first.score_groups([sample(0)], group))[0]
    resumed_pool = SeedEchoPool()
    resumed = env_on(resumed_pool)
    resumed.load_state_dict(state)
    got = asyncio.run(resumed.score_groups([sample(0)], group))[0]
    assert resumed_pool.seen == first_pool.seen  # same seeds, same orientation
    assert [s.reward for s in got] == [s.reward for s in expected]
