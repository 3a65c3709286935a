"""Held-out evaluation in both reasoning modes: as trained (thinking, with its budget) and with thinking off."""

from __future__ import annotations

from posttrain.config import GenerationConfig
from posttrain.environments.base import Sample, Score
from posttrain.rlvr.evaluate import evaluate_modes, well_formed
from posttrain.rollout.types import Rollout


class AnswersWhenThinking:
    """Scores 1 when the completion came from a thinking prompt (it carries reasoning)."""

    name = "mode"
    eval_metrics = ()

    def samples(self, split, seed):
        return [Sample(f"{split}/{i}", [{"role": "user", "content": str(i)}]) for i in range(4)]

    async def score(self, sample, completion):
        return Score(float(completion == "thought"))


class Engines:
    def __init__(self):
        self.asked = []

    def generate(self, prompts, gen, n):
        self.asked.append((gen.enable_thinking, gen.reasoning_budget, gen.temperature))
        thinking = gen.enable_thinking
        return [[Rollout(p, 0, [1], [2, 3], [0.0, 0.0], "x", "stop", "r" if thinking else None,
                         "thought" if thinking else "direct", True, 7 if thinking else 0)]
                for p in range(len(prompts))]


def test_both_modes_are_measured_with_reasoning_length():
    engines = Engines()
    gen = GenerationConfig(enable_thinking=True, reasoning_budget=64, temperature=0.8)
    out = evaluate_modes(engines, {"mode": AnswersWhenThinking()}, gen, 4, 0, True)
    assert engines.asked == [(True, 64, 0.0), (False, None, 0.0)]  # greedy; the budget only with thinking
    assert out["eval/mode/accuracy"] == 1.0 and out["eval/mode/no_think/accuracy"] == 0.0
    assert out["eval/mode/reasoning_tokens"] == 7.0 and out["eval/mode/reasoning_closed"] == 1.0
    assert out["eval/mode/well_formed"] == 1.0  # closed at 7 tokens, inside the budget of 64
    assert "eval/mode/no_think/reasoning_tokens" not in out and "eval/mode/no_think/well_formed" not in out


def test_well_formed_is_the_models_own_close_then_an_answer():
    def rollout(closed=True, tokens=10, answer="The answer is 4."):
        return Rollout(0, 0, [1], [2], [0.0], "x", "stop", "r", answer, closed, tokens)

    assert well_formed(rollout(), 64) and well_formed(rollout(tokens=500), None)
    assert not well_formed(rollout(tokens=64), 64)  # cut at the budget: the engine closed it, not the model
    assert not well_formed(rollout(closed=False), 64)  # stopped inside <think>
    assert not well_formed(rollout(answer="  "), 64) and not well_formed(rollout(answer="4 </think> 5"), 64)


def test_one_mode_when_training_does_not_think_or_it_is_off():
    engines = Engines()
    out = evaluate_modes(engines, {"mode": AnswersWhenThinking()}, GenerationConfig(enable_thinking=False), 4, 0, True)
    assert engines.asked == [(False, None, 0.0)] and not any("no_think" in k for k in out)
    engines = Engines()
    evaluate_modes(engines, {"mode": AnswersWhenThinking()}, GenerationConfig(enable_thinking=True), 4, 0, False)
    assert len(engines.asked) == 1


def test_an_answer_that_reopens_the_reasoning_scores_zero_whatever_the_verifier_says():
    class Reopens(Engines):
        def generate(self, prompts, gen, n):
            answer = "thought </think> thought" if gen.enable_thinking else "thought"
            return [[Rollout(p, 0, [1], [2, 3], [0.0, 0.0], "x", "stop", "r" if gen.enable_thinking else None,
                             answer, True, 7 if gen.enable_thinking else 0)] for p in range(len(prompts))]

    class Contains(AnswersWhenThinking):
        async def score(self, sample, completion):
            return Score(float("thought" in completion))

    out = evaluate_modes(Reopens(), {"mode": Contains()}, GenerationConfig(enable_thinking=True), 4, 0, True)
    assert out["eval/mode/accuracy"] == 0.0 and out["eval/mode/reward"] == 0.0
    assert out["eval/mode/no_think/accuracy"] == 1.0  # without thinking there is no reasoning to reopen
