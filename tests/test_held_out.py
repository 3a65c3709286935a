"""`posttrain eval` (posttrain.held_out): greedy accuracy and pass@k of any model, through the CLI,
with a scripted rollout pool (the engines are tested elsewhere; here: what is counted and how)."""

from __future__ import annotations

import itertools
import json

import pytest

from posttrain.cli import main as cli
from posttrain.environments.base import Sample, Score
from posttrain.held_out import pass_at_k
from posttrain.rollout.types import Rollout

CORRECT = [0, 1, 3, 4]  # correct answers among the 4 sampled for test prompt i


class EchoEnv:
    """Prompt i; an answer holding "yes" is right."""

    name = "echo"

    def samples(self, split, seed):
        return [Sample(f"{split}/{i}", [{"role": "user", "content": f"prompt {i}"}]) for i in range(len(CORRECT))]

    async def score(self, sample, completion):
        return Score(1.0 if "yes" in completion else 0.0)


class ScriptedPool:
    """Greedy: right on even prompts. Sampled: the first CORRECT[i] answers of prompt i are right."""

    def __init__(self, *args, **kwargs):
        pass

    def generate(self, prompts, gen, n):
        out = []
        for p, messages in enumerate(prompts):
            i = int(messages[-1]["content"].split()[-1])
            texts = (["yes" if i % 2 == 0 else "no"] if gen.temperature == 0
                     else ["yes" if j < CORRECT[i] else "no" for j in range(n)])
            out.append([Rollout(p, j, [1], [2], [0.0], t, "stop", None, t, True, 0) for j, t in enumerate(texts)])
        return out

    def shutdown(self):
        pass


def test_pass_at_k_is_the_chance_that_k_of_the_n_answers_hold_a_right_one():
    for n in range(1, 7):
        for c in range(n + 1):
            answers = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                subsets = list(itertools.combinations(answers, k))
                assert pass_at_k(n, c, k) == pytest.approx(sum(any(s) for s in subsets) / len(subsets))
    with pytest.raises(ValueError, match="at least 5 samples"):
        pass_at_k(4, 1, 5)


def test_eval_command_prints_and_writes_greedy_accuracy_and_pass_at_k(tmp_path, monkeypatch, capsys):
    import posttrain.rollout.pool as rollout_pool

    monkeypatch.setattr(rollout_pool, "RolloutPool", ScriptedPool)
    out = tmp_path / "result.json"
    assert cli(["eval", "--model", "tiny-llama", "environments=[{name: 'test_held_out:EchoEnv'}]", "pass_k=[1,2,4]",
                "generation.enable_thinking=false", f"out={out}"]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["eval/echo/accuracy"] == 0.5 and metrics["eval/echo/prompts"] == 4
    assert metrics["eval/echo/pass@1"] == pytest.approx(8 / 16)  # mean of c / n
    assert metrics["eval/echo/pass@2"] == pytest.approx((0 + 0.5 + 1 + 1) / 4)  # 1 - C(n-c, 2) / C(n, 2)
    assert metrics["eval/echo/pass@4"] == pytest.approx(3 / 4) and metrics["eval/echo/samples"] == 4
    printed = capsys.readouterr().out
    assert "eval/echo/pass@2" in printed and printed.index("eval/echo/accuracy") < printed.index("eval/echo/prompts")


def test_eval_config_refuses_what_cannot_be_measured(capsys):
    assert cli(["eval", "pass_k=[4]", "samples=2", "--dry-run"]) == 2
    assert "fewer than the largest pass_k" in capsys.readouterr().err
    assert cli(["eval", "pass_k=[2]", "generation.temperature=0", "--dry-run"]) == 2
    assert "temperature > 0" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_of_a_real_model_on_vllm(tmp_path, tiny_llama_dir):
    from posttrain.orchestration import cluster

    out = tmp_path / "r.json"
    try:
        assert cli(["eval", "--model", str(tiny_llama_dir), "environments=[{name: math, options: {levels: [1]}}]",
                    "prompts=3", "pass_k=[1,2]", "generation.max_new_tokens=8", "generation.reasoning_budget=4",
                    "rollout.max_model_len=512", "rollout.kv_cache_gib=1", f"out={out}"]) == 0
    finally:
        cluster.shutdown_ray()
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["eval/math/prompts"] == 3 and metrics["eval/math/no_think/prompts"] == 3
    assert 0 <= metrics["eval/math/pass@1"] <= metrics["eval/math/pass@2"] <= 1
    assert metrics["eval/math/reasoning_tokens"] <= 4 + 1  # the budget held
