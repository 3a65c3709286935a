"""`math`: problems with a final answer, checked by the math verifier (math-verify).

Data: an offline generator of graded difficulty (levels 1-5, from one-step sums to multi-step
word problems with fractions and percentages), or a dataset in the common shapes:
GSM8K (``question`` / ``answer`` ending in ``#### 42``), MATH (``problem`` / ``solution`` with
``\\boxed{}``), or plain ``question`` / ``answer``.
"""

from __future__ import annotations

import random
from fractions import Fraction
from typing import Any, Literal

from posttrain.environments.base import DefaultHooks, Sample, Score, ScoreKind, user_prompt
from posttrain.environments.data import DataError, DataSpec, OnInvalid, require

INSTRUCTION = "Put your final answer within \\boxed{}."
Format = Literal["auto", "gsm8k", "math", "plain"]


def generate_problem(rng: random.Random, level: int) -> tuple[str, str]:
    """(question, exact answer) at difficulty ``level`` (1 = easiest, 5 = hardest)."""
    if level == 1:
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        return f"What is {a} + {b}?", str(a + b)
    if level == 2:
        a, b = rng.randint(11, 99), rng.randint(2, 12)
        op = rng.choice(["-", "*"])
        return f"What is {a} {op} {b}?", str(a - b if op == "-" else a * b)
    if level == 3:
        a, b, c = rng.randint(2, 30), rng.randint(2, 30), rng.randint(2, 9)
        return f"Compute ({a} + {b}) * {c} - {a}.", str((a + b) * c - a)
    if level == 4:
        n, price, spent = rng.randint(3, 12), rng.randint(2, 15), rng.randint(1, 5)
        budget = n * price + rng.randint(5, 40)
        q = (f"Sam has ${budget}. He buys {n} notebooks at ${price} each and then spends ${spent} "
             f"on a pen. How many dollars does Sam have left?")
        return q, str(budget - n * price - spent)
    a, b = Fraction(rng.randint(1, 9), rng.randint(2, 9)), Fraction(rng.randint(1, 9), rng.randint(2, 9))
    pct = rng.choice([10, 20, 25, 50])
    q = (f"A tank holds {a.numerator}/{a.denominator} of its capacity of water. Then "
         f"{b.numerator}/{b.denominator} of the capacity is added, and finally {pct}% of the water in the "
         f"tank is removed. What fraction of the capacity is now in the tank? Give it in lowest terms.")
    value = (a + b) * Fraction(100 - pct, 100)
    return q, str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


def gold_from_row(row: Any, fmt: Format) -> tuple[str, str]:
    """(question, gold answer) of one dataset row; raises DataError naming the field."""
    from posttrain.verifiers.math import extract_answer

    if fmt == "auto":
        fmt = "math" if isinstance(row, dict) and "problem" in row else "gsm8k"
    if fmt == "math":
        _raise_on(require(row, {"problem": str, "solution": str}))
        gold = extract_answer(row["solution"], ("boxed",))
        if gold is None:
            raise DataError("field 'solution' has no \\boxed{} answer")
        return row["problem"], gold
    _raise_on(require(row, {"question": str, "answer": (str, int, float)}))
    answer = str(row["answer"])
    if fmt == "gsm8k" and "####" in answer:
        answer = answer.rsplit("####", 1)[1]
    answer = answer.strip().replace(",", "") if fmt == "gsm8k" else answer.strip()
    if not answer:
        raise DataError("field 'answer' has no final answer")
    return row["question"], answer


def _raise_on(problems: list[str]) -> None:
    if problems:
        raise DataError("; ".join(problems))


class MathEnv(DefaultHooks):
    """Math problems with a final answer, checked by math-verify.

    Options:
        source: dataset (JSONL/Parquet file, folder or hub id); None = the built-in arithmetic generator
        format: row shape of source: auto | gsm8k (question, answer with ####) | math (problem, boxed
            solution) | plain (question, answer)
        test_source: held-out dataset; None = the generator's test split, or a split of source
        levels: generator difficulty levels, a non-empty subset of 1..5
        size: generator train problems
        test_size: generator held-out problems
        limit: first N rows of source (None = all)
        on_invalid: a bad row of source: skip (counted, logged) | error
        system: system prompt added to every sample (None = none)
        workers: math-verify processes checking at once (started on the first check, ended by close())
    """

    name = "math"

    def __init__(self, source: str | None = None, format: Format = "auto", test_source: str | None = None,
                 levels: tuple[int, ...] | list[int] = (1, 2, 3, 4, 5), size: int = 500, test_size: int = 100,
                 limit: int | None = None, on_invalid: OnInvalid = "skip", system: str | None = None,
                 workers: int = 2) -> None:
        if format not in ("auto", "gsm8k", "math", "plain"):
            raise ValueError(f"format must be auto, gsm8k, math or plain (got {format!r})")
        bad = [lv for lv in levels if lv not in range(1, 6)]
        if bad or not levels:
            raise ValueError(f"levels must be a non-empty subset of 1..5 (got {list(levels)})")
        self.data = DataSpec(source, size, test_size, limit, on_invalid, test_source)
        self.format, self.levels, self.system = format, tuple(levels), system
        from posttrain.verifiers.math import MathCheckerPool

        self._checkers = MathCheckerPool(size=workers)

    def samples(self, split: str, seed: int) -> list[Sample]:
        self.data.check_split(split)
        if self.data.source is None:
            return self._generated(split, seed)
        pairs = self.data.rows(split, lambda row: gold_from_row(row, self.format))
        return [Sample(id=f"{split}/{i}", messages=user_prompt(f"{q}\n\n{INSTRUCTION}", self.system), answer=a)
                for i, (q, a) in enumerate(pairs)]

    def _generated(self, split: str, seed: int) -> list[Sample]:
        rng = random.Random(f"math/{split}/{seed}")  # train and test draw from different streams
        out = []
        for i in range(self.data.generated_count(split)):
            level = self.levels[i % len(self.levels)]
            question, answer = generate_problem(rng, level)
            out.append(Sample(id=f"gen/{split}/{seed}/{i}", answer=answer, info={"level": level},
                              messages=user_prompt(f"{question}\n\n{INSTRUCTION}", self.system)))
        return out

    @staticmethod
    def gold_answer(sample: Sample) -> str:
        return f"The answer is \\boxed{{{sample.answer}}}."

    async def score(self, sample: Sample, completion: str) -> Score:
        result = await self._checkers.acheck(completion, str(sample.answer))
        metrics = {"check_seconds": result.seconds}
        if result.reward is None:  # the checker could not judge (worker failed, gold does not parse)
            return Score.failed(ScoreKind.INFRA, result.detail, metrics)
        if result.kind in ("correct", "wrong_answer"):
            return Score(result.reward, metrics)
        return Score(result.reward, metrics, result.kind, ScoreKind.INVALID)  # no answer, unsimplified, ...

    def close(self) -> None:
        self._checkers.close()
