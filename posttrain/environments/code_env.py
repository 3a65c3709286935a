"""`code`: programming problems scored by unit tests in the sandbox.

Data: a small shipped set (20 HumanEval-shaped problems), or a dataset of HumanEval records
(``task_id``, ``prompt``, ``test``, ``entry_point``) or MBPP records (``text``, ``test_list``
of asserts, optional ``test_setup_code``). The model writes a complete function; the last
fenced code block of its answer (or the whole answer) is the program. Verdicts come from
``posttrain.verifiers.code``: the tests run on the trusted side, the candidate in the sandbox.
"""

from __future__ import annotations

import json
import re
from importlib import resources
from typing import Any, Literal

from posttrain.environments.base import DefaultHooks, Sample, Score, ScoreKind, StageResources, user_prompt
from posttrain.environments.data import DataError, OnInvalid, load_rows, require, validate_rows

Format = Literal["auto", "humaneval", "mbpp"]
_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL | re.IGNORECASE)
_MBPP_NAME = re.compile(r"assert\s+(?:not\s+)?\(?\s*([A-Za-z_]\w*)\s*\(")
MAX_PROGRAM_CHARS = 50_000


def extract_program(answer: str) -> str:
    """The last fenced code block, else the whole answer (capped: output is untrusted)."""
    answer = answer[-MAX_PROGRAM_CHARS * 2 :]
    blocks = _FENCE.findall(answer)
    return (blocks[-1] if blocks else answer)[:MAX_PROGRAM_CHARS]


def problem_from_row(row: Any, fmt: Format) -> dict[str, str]:
    """A HumanEval-shaped problem from a HumanEval or MBPP row; DataError names the field."""
    if fmt == "auto":
        fmt = "mbpp" if isinstance(row, dict) and "test_list" in row else "humaneval"
    if fmt == "humaneval":
        problems = require(row, {"prompt": str, "test": str, "entry_point": str})
        if problems:
            raise DataError("; ".join(problems))
        if "def check(" not in row["test"]:
            raise DataError("field 'test' defines no check(candidate) function")
        # The prompt's helper functions (HumanEval's decode_cyclic kind) are dataset code: the
        # trusted-side test harness defines them before running check(candidate).
        return {k: str(row[k]) for k in ("prompt", "test", "entry_point")} | {
            "task_id": str(row.get("task_id", "")), "solution": str(row.get("canonical_solution") or ""),
            "helpers": str(row["prompt"])}
    problems = require(row, {"text": str, "test_list": list})
    if problems:
        raise DataError("; ".join(problems))
    asserts = [t for t in row["test_list"] if isinstance(t, str) and t.strip()]
    match = _MBPP_NAME.search(asserts[0]) if asserts else None
    if match is None:
        raise DataError("field 'test_list' has no `assert name(...)` test to take the function name from")
    name = match.group(1)
    setup = str(row.get("test_setup_code") or "")
    body = "".join(f"    {a.strip().replace(name + '(', 'candidate(')}\n" for a in asserts)
    prompt = f"{row['text'].strip()}\nYour function must be named `{name}` and pass tests like:\n{asserts[0]}"
    return {"task_id": str(row.get("task_id", "")), "prompt": prompt, "entry_point": name,
            "test": f"{setup}\ndef check(candidate):\n{body}", "solution": str(row.get("code") or ""), "helpers": ""}


def shipped_problems() -> list[dict[str, Any]]:
    text = resources.files("posttrain.environments").joinpath("builtin_data/code_problems.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class CodeEnv(DefaultHooks):
    """Python programming problems, checked by running their unit tests in the sandbox.

    Programs run on the code runner the stage starts it with (its sandbox-N actors, under its
    sandbox limits: training and held-out evaluation alike); unstarted, from this process.

    Options:
        source: dataset (JSONL/Parquet file, folder or hub id); None = the shipped problem set
        format: row shape: auto | humaneval (prompt, test, entry_point) | mbpp (text, test_list)
        limit: first N rows (None = all)
        on_invalid: a bad row: skip (counted, logged) | error
        system: system prompt added to every sample (None = none)
        test_fraction: share of the problems held out for evaluation, in [0, 1)
    """

    name = "code"
    sandboxed = True  # the stage starts sandbox-N actors and hands them over in start()

    def __init__(self, source: str | None = None, format: Format = "auto", limit: int | None = None,
                 on_invalid: OnInvalid = "skip", system: str | None = None, test_fraction: float = 0.25) -> None:
        if format not in ("auto", "humaneval", "mbpp"):
            raise ValueError(f"format must be auto, humaneval or mbpp (got {format!r})")
        if not 0.0 <= test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1) (got {test_fraction})")
        self.source, self.format, self.limit = source, format, limit
        self.on_invalid, self.system, self.test_fraction = on_invalid, system, test_fraction
        self._runner: Any = None  # a posttrain.verifiers.service.CodeRunner; None = LocalRunner()

    def start(self, resources: StageResources) -> None:
        self._runner = resources.code_runner

    def close(self) -> None:
        self._runner = None  # the runner is the stage's: it shuts it down

    def samples(self, split: str, seed: int) -> list[Sample]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test' (got {split!r})")
        if self.source is None:
            rows, source = shipped_problems(), "shipped"
            cut = round(len(rows) * (1 - self.test_fraction))  # fixed split of the shipped set
            rows = rows[:cut] if split == "train" else rows[cut:]
        else:
            rows, source = load_rows(self.source, split=split, limit=self.limit), self.source
        problems = validate_rows(rows, lambda i, row: problem_from_row(row, self.format), source=source,
                                 on_invalid=self.on_invalid)
        return [self._sample(split, i, p) for i, p in enumerate(problems)]

    def _sample(self, split: str, i: int, problem: dict[str, str]) -> Sample:
        text = (f"Write a Python function.\n\n{problem['prompt']}\n\n"
                "Answer with the complete function in one ```python code block.")
        return Sample(id=problem["task_id"] or f"{split}/{i}", messages=user_prompt(text, self.system),
                      answer=problem, info={"entry_point": problem["entry_point"]})

    @staticmethod
    def gold_answer(sample: Sample) -> str:
        """A completion that must pass (used by `env check`)."""
        p = sample.answer
        program = p["solution"] if "def " in p["solution"] else p["prompt"] + p["solution"]
        return f"```python\n{program}\n```"

    async def score(self, sample: Sample, completion: str) -> Score:
        from posttrain.verifiers.pool import CodeJob
        from posttrain.verifiers.service import LocalRunner

        problem = sample.answer
        program = extract_program(completion)
        if not program.strip():
            return Score.failed(ScoreKind.INVALID, "no ```python block or function in the answer")
        function = {"entry_point": problem["entry_point"], "test": problem["test"], "helpers": problem.get("helpers", "")}
        if self._runner is None:
            self._runner = LocalRunner()
        result = await self._runner.arun(CodeJob(program, function=function))
        metrics = {"exec_seconds": result.seconds}
        if result.reward is None:
            return Score.failed(ScoreKind.INFRA, result.detail[:200], metrics)
        if result.passed or result.kind == "wrong_answer":
            return Score(result.reward, metrics)
        return Score(result.reward, metrics, result.kind, ScoreKind.INVALID)  # syntax error, timeout, crash, ...
