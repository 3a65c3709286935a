"""`posttrain env check`: prove an environment's rewards mean what they say.

Gold answers must score 1.0; empty, garbage and adversarial completions must score 0. An
environment gives its gold completion through its ``gold_answer(sample)`` hook (default:
``str(sample.answer)``, none when the sample has no answer).

A multi-turn environment plays whole episodes, without a model or tokens: its scripted
``gold_episode(sample)`` must end at reward 1.0; every GARBAGE text and every malformed tool
call (MALFORMED_CALLS), repeated each turn until the environment ends the episode or
``max_turns`` cuts it, must end at 0. Turns are parsed from text as the rollout parses them
(``posttrain.tool_calls.assistant_turn``) and go through the runner's own safe wrappers.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from posttrain.environments.base import Environment, Sample, Score, ScoreKind, score_batch
from posttrain.environments.multiturn import (AssistantTurn, Episode, MultiTurnEnvironment, is_multiturn,
                                              reset_safely, step_safely)
from posttrain.errors import DataError
from posttrain.tool_calls import assistant_message, assistant_turn

GARBAGE: dict[str, str] = {
    "empty": "",
    "whitespace": " \n\t ",
    "refusal": "I don't know.",
    "noise": "qzx vbn 8f@# lorem ipsum",
    "empty_boxed": "\\boxed{}",
    "power_tower": "\\boxed{9^{9^{9^{9}}}}",
    "huge_number": "\\boxed{" + "9" * 100_000 + "}",
    "exit_early": "```python\nimport os\nos._exit(0)\n```",
    "fake_json": "{}",
    "deep_nesting": "(" * 5000 + "1" + ")" * 5000,
    "think_only": "<think>the answer is surely right</think>",
}
# Tool calls a parser must turn into error observations, never into a tool run or a reward.
# "{tool}" is the environment's first tool (or "python").
MALFORMED_CALLS: dict[str, str] = {
    "call_not_json": "<tool_call>\n{not json at all}\n</tool_call>",
    "call_unclosed": '<tool_call>\n{"name": "{tool}", "arguments": {"code": "print(1)"',
    "call_unknown_tool": '<tool_call>\n{"name": "no_such_tool", "arguments": {}}\n</tool_call>',
    "call_bad_arguments": '<tool_call>\n{"name": "{tool}", "arguments": {"wrong": [1, 2]}}\n</tool_call>',
    "call_arguments_not_object": '<tool_call>\n{"name": "{tool}", "arguments": 42}\n</tool_call>',
    "call_no_name": '<tool_call>\n{"arguments": {"code": "print(1)"}}\n</tool_call>',
}
DEFAULT_MAX_TURNS = 8  # a multi-turn environment that does not say how many turns it takes


@dataclass
class CheckReport:
    env: str
    n_samples: int
    n_gold: int = 0
    gold_failures: list[tuple[str, Score]] = field(default_factory=list)
    garbage_failures: list[tuple[str, str, Score]] = field(default_factory=list)  # (sample, case, score)
    errors: Counter[str] = field(default_factory=Counter)
    n_cases: int = len(GARBAGE)  # garbage cases per sample
    max_turns: int | None = None  # multi-turn: the episode's turn limit

    @property
    def ok(self) -> bool:
        return not self.gold_failures and not self.garbage_failures

    def lines(self) -> list[str]:
        what = "answers" if self.max_turns is None else "episodes"
        kind = "" if self.max_turns is None else f" (multi-turn, at most {self.max_turns} turns)"
        out = [f"environment {self.env}{kind}: {self.n_samples} samples, {self.n_cases} garbage cases each"]
        out.append(f"  gold {what} scoring 1.0: {self.n_gold - len(self.gold_failures)}/{self.n_gold}"
                   + ("" if self.n_gold == self.n_samples else f" ({self.n_samples - self.n_gold} samples carry no gold)"))
        for sid, score in self.gold_failures[:5]:
            out.append(f"    FAIL gold {sid}: reward {score.reward} ({score.kind}: {score.error})")
        total = self.n_samples * self.n_cases
        out.append(f"  garbage {what} scoring 0: {total - len(self.garbage_failures)}/{total}")
        for sid, case, score in self.garbage_failures[:5]:
            out.append(f"    FAIL garbage {case!r} on {sid}: reward {score.reward}")
        if self.errors:
            out.append("  error kinds seen (expected for garbage): " + ", ".join(f"{k}={v}" for k, v in self.errors.most_common()))
        out.append("  OK" if self.ok else "  FAILED")
        return out


def check_environment(env: Environment, n: int = 10, seed: int = 0, concurrency: int = 4) -> CheckReport:
    samples = list(env.samples("train", seed))[:n]
    if not samples:
        raise DataError(f"environment {env.name!r} yielded no samples")
    if is_multiturn(env):
        return asyncio.run(check_multiturn(env, samples, concurrency))
    report = CheckReport(env.name, len(samples))
    golds = [(s, env.gold_answer(s)) for s in samples]
    pairs: list[tuple[Sample, str, str]] = [(s, "gold", g) for s, g in golds if g is not None]
    report.n_gold = len(pairs)
    pairs += [(s, case, text) for s in samples for case, text in GARBAGE.items()]
    scores = asyncio.run(score_batch(env, [p[0] for p in pairs], [p[2] for p in pairs], concurrency))
    return _tally(report, [(sample, case) for sample, case, _ in pairs], scores)


def _tally(report: CheckReport, cases: Sequence[tuple[Sample, str]], scores: Sequence[Score]) -> CheckReport:
    """Count errors; gold cases must score 1.0 and every other case 0.0."""
    for (sample, case), score in zip(cases, scores):
        if score.kind is not ScoreKind.OK:
            report.errors[score.kind] += 1
        if case == "gold" and score.reward != 1.0:
            report.gold_failures.append((sample.id, score))
        elif case != "gold" and score.reward != 0.0:
            report.garbage_failures.append((sample.id, case, score))
    return report


def text_turn(text: str) -> AssistantTurn:
    """An assistant turn parsed from ``text`` as the rollout parses a generated turn (thinking off)."""
    return assistant_turn(text, thinking=False, finish_reason="stop")


def garbage_cases(env: MultiTurnEnvironment) -> dict[str, str]:
    """GARBAGE texts and malformed calls naming the environment's first tool."""
    tools = list(getattr(env, "tools", None) or ())
    first = tools[0] if tools else {}
    tool = (first.get("function") or first).get("name", "python") if isinstance(first, dict) else "python"
    return GARBAGE | {case: text.replace("{tool}", str(tool)) for case, text in MALFORMED_CALLS.items()}


async def play_episode(env: MultiTurnEnvironment, sample: Sample, turns: Sequence[str], *, repeat: bool,
                       max_turns: int, timeout: float = 60.0) -> Score:
    """One episode whose assistant turns are ``turns`` (the last one again while ``repeat``). The score the
    environment ends it with; reward 0 when the script runs out or ``max_turns`` cuts it first."""
    episode = await reset_safely(env, sample, timeout)
    if isinstance(episode, Score):
        return episode
    assert isinstance(episode, Episode)
    for i in range(max_turns):
        if i >= len(turns) and not repeat:
            return Score.failed(ScoreKind.INVALID, f"the scripted episode ended after {len(turns)} turns "
                                                   "and the environment had not ended it")
        turn = text_turn(turns[min(i, len(turns) - 1)])
        episode.messages.append(assistant_message(turn))  # as the rollout records it, before the step
        obs = await step_safely(env, episode, turn, timeout)
        episode.messages.extend(obs.messages)
        episode.turn += 1
        if obs.done:
            return obs.score if obs.score is not None else Score.failed(ScoreKind.INVALID, "no score")
    return Score.failed(ScoreKind.INVALID, f"cut after {max_turns} turns")


async def check_multiturn(env: MultiTurnEnvironment, samples: Sequence[Sample], concurrency: int = 4) -> CheckReport:
    """Gold episodes must score 1.0, garbage and malformed calls repeated each turn must score 0."""
    max_turns = int(getattr(env, "max_turns", DEFAULT_MAX_TURNS) or DEFAULT_MAX_TURNS)
    cases = garbage_cases(env)
    report = CheckReport(env.name, len(samples), n_cases=len(cases), max_turns=max_turns)
    runs: list[tuple[Sample, str, list[str], bool]] = []
    for sample in samples:
        gold = env.gold_episode(sample) if callable(getattr(env, "gold_episode", None)) else None
        if gold:
            runs.append((sample, "gold", list(gold), False))
        runs += [(sample, case, [text], True) for case, text in cases.items()]
    report.n_gold = sum(1 for r in runs if r[1] == "gold")
    gate = asyncio.Semaphore(max(1, concurrency))

    async def one(sample: Sample, turns: list[str], repeat: bool) -> Score:
        async with gate:
            return await play_episode(env, sample, turns, repeat=repeat, max_turns=max_turns)

    scores = await asyncio.gather(*(one(s, turns, repeat) for s, _, turns, repeat in runs))
    return _tally(report, [(sample, case) for sample, case, _, _ in runs], scores)


def reward_histogram(scores: Sequence[Score], bins: int = 5) -> list[str]:
    """Text histogram of rewards in [0, 1]."""
    counts = [0] * bins
    for s in scores:
        counts[min(bins - 1, int(s.reward * bins))] += 1
    width = max(counts) or 1
    return [f"  [{i / bins:.1f}, {(i + 1) / bins:.1f}{']' if i == bins - 1 else ')'} "
            f"{'#' * round(30 * c / width):30s} {c}" for i, c in enumerate(counts)]


def sample_with_model(env: Environment, model_name: str, n: int, max_new_tokens: int = 128,
                      seed: int = 0) -> tuple[list[Any], list[Score]]:
    """One completion per prompt from an in-process rollout engine (transformers), scored (a quick look, not RL)."""
    from posttrain.config import GenerationConfig, ModelConfig, RolloutConfig
    from posttrain.rollout.engine import RolloutEngine

    samples = list(env.samples("train", seed))[:n]
    engine = RolloutEngine(ModelConfig(name=model_name), RolloutConfig(backend="transformers"))
    try:
        gen = GenerationConfig(max_new_tokens=max_new_tokens, temperature=0.7, enable_thinking=False, seed=seed)
        groups = engine.generate([s.messages for s in samples], gen)
    finally:
        engine.shutdown()
    answers = [group[0].answer for group in groups]
    return answers, asyncio.run(score_batch(env, samples, answers))
