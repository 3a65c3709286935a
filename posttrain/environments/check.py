"""`posttrain env check`: prove an environment's rewards mean what they say.

Gold answers must score 1.0; empty, garbage and adversarial completions must score 0. An
environment gives its gold completion through its ``gold_answer(sample)`` hook (default:
``str(sample.answer)``, none when the sample has no answer).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from posttrain.environments.base import Environment, Sample, Score, ScoreKind, score_batch
from posttrain.errors import DataError

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


@dataclass
class CheckReport:
    env: str
    n_samples: int
    n_gold: int = 0
    gold_failures: list[tuple[str, Score]] = field(default_factory=list)
    garbage_failures: list[tuple[str, str, Score]] = field(default_factory=list)  # (sample, case, score)
    errors: Counter[str] = field(default_factory=Counter)

    @property
    def ok(self) -> bool:
        return not self.gold_failures and not self.garbage_failures

    def lines(self) -> list[str]:
        out = [f"environment {self.env}: {self.n_samples} samples, {len(GARBAGE)} garbage cases each"]
        out.append(f"  gold answers scoring 1.0: {self.n_gold - len(self.gold_failures)}/{self.n_gold}"
                   + ("" if self.n_gold == self.n_samples else f" ({self.n_samples - self.n_gold} samples carry no gold)"))
        for sid, score in self.gold_failures[:5]:
            out.append(f"    FAIL gold {sid}: reward {score.reward} ({score.kind}: {score.error})")
        total = self.n_samples * len(GARBAGE)
        out.append(f"  garbage scoring 0: {total - len(self.garbage_failures)}/{total}")
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
    report = CheckReport(env.name, len(samples))
    golds = [(s, env.gold_answer(s)) for s in samples]
    pairs: list[tuple[Sample, str, str]] = [(s, "gold", g) for s, g in golds if g is not None]
    report.n_gold = len(pairs)
    pairs += [(s, case, text) for s in samples for case, text in GARBAGE.items()]
    scores = asyncio.run(score_batch(env, [p[0] for p in pairs], [p[2] for p in pairs], concurrency))
    for (sample, case, _), score in zip(pairs, scores):
        if score.kind is not ScoreKind.OK:
            report.errors[score.kind] += 1
        if case == "gold" and score.reward != 1.0:
            report.gold_failures.append((sample.id, score))
        elif case != "gold" and score.reward != 0.0:
            report.garbage_failures.append((sample.id, case, score))
    return report


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
