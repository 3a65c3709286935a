"""``posttrain verify code|math``: score files in the formats people already use.

- ``verify code --problems P.jsonl --completions C.jsonl [--k 1,10]``: HumanEval records
  (``task_id``, ``prompt``, ``test``, ``entry_point``) and completions (``task_id``,
  ``completion``); prints pass@k (the unbiased estimator) and writes per-sample JSONL.
- ``verify math --pairs F.jsonl`` (``prediction``, ``answer``): prints accuracy, per-row verdicts.

Every row, field and option is checked before anything is scored: bad input is an error naming
the file, line and field (exit 2). A problem that cannot score anyone (its test is not code that
compiles, fails on its own, or its entry_point is not the prompt's function) is an infrastructure
failure: its samples are reported apart, never scored as failures (exit 1).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from math import comb
from pathlib import Path
from typing import Any

Row = dict[str, Any]


def read_jsonl(path: str) -> list[tuple[int, Row]]:
    """``(line number, object)`` for each non-blank line; ValueError naming file and line otherwise."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ValueError(f"{path} is a folder: give a JSONL file") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read it ({exc.strerror})") from None
    rows = []
    for n, raw in enumerate(data.splitlines(), 1):
        try:
            line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}:{n} is not UTF-8 (byte {raw[exc.start]:#04x} at column {exc.start + 1}): "
                             "save the file as UTF-8") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{n} is not JSON ({exc.msg}, column {exc.colno}): one object per line") from None
        except RecursionError:
            raise ValueError(f"{path}:{n} is nested too deeply to read: one flat object per line") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}:{n} is {_describe(row)}, not an object: one JSON object per line")
        rows.append((n, row))
    if not rows:
        raise ValueError(f"{path} has no rows: one JSON object per line")
    return rows


def _describe(value: Any) -> str:
    """A JSON value as a reader names it: ``null``, ``a list (JSON array) [1, 2]``, ``a number 3``."""
    if value is None:
        return "null"
    kind = {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list (JSON array)",
            dict: "an object"}.get(type(value), type(value).__name__)
    text = json.dumps(value, ensure_ascii=False)
    return f"{kind} {text if len(text) <= 40 else text[:37] + '...'}"


def _field(path: str, n: int, row: Row, key: str, kinds: tuple[type, ...], expected: str) -> Any:
    """``row[key]`` if present and of one of ``kinds`` (bool is never a number here)."""
    if key not in row:
        raise ValueError(f"{path}:{n}: field {key!r} is missing (the row has {sorted(row)}): it must be {expected}")
    value = row[key]
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise ValueError(f"{path}:{n}: field {key!r} must be {expected} (got {_describe(value)})")
    return value


TASK_ID = ((str, int), "a string or whole number")


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of a task with ``n`` samples, ``c`` correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def load_problems(path: str) -> dict[str | int, Row]:
    """HumanEval records by task_id; every field an error names is checked here."""
    problems: dict[str | int, Row] = {}
    lines: dict[str | int, int] = {}
    for n, row in read_jsonl(path):
        task_id = _field(path, n, row, "task_id", *TASK_ID)
        _field(path, n, row, "prompt", (str,), "a string (the code the completion continues)")
        entry_point = _field(path, n, row, "entry_point", (str,), "a string (the function's name)")
        if not entry_point.isidentifier():
            raise ValueError(f"{path}:{n}: field 'entry_point' must be a Python function name (got {entry_point!r})")
        if "test" not in row:  # a test of the wrong type is a broken problem: reported as infra, not here
            raise ValueError(f"{path}:{n}: field 'test' is missing (the row has {sorted(row)}): it must be Python "
                             "code with asserts or a check(candidate) function")
        if task_id in problems:
            raise ValueError(f"{path}:{n}: task_id {task_id!r} repeats line {lines[task_id]}: each problem once")
        problems[task_id], lines[task_id] = row, n
    return problems


def load_completions(path: str, problems: dict[str | int, Row], problems_path: str) -> list[Row]:
    samples = []
    for n, row in read_jsonl(path):
        task_id = _field(path, n, row, "task_id", *TASK_ID)
        _field(path, n, row, "completion", (str,), "a string (the code that follows the prompt)")
        if task_id not in problems:
            raise ValueError(f"{path}:{n}: task_id {task_id!r} has no problem in {problems_path}")
        samples.append(row)
    return samples


def _output(out: Path, inputs: tuple[str, ...]) -> Path:
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder: give a file path")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: folder {out.parent} does not exist: create it first")
    if any(out.resolve() == Path(p).resolve() for p in inputs):
        raise ValueError(f"--out {out} is an input file: it would be overwritten; give another path")
    return out


def _code(args: argparse.Namespace) -> int:
    from posttrain.verifiers import code
    from posttrain.verifiers.sandbox import Limits, detect_isolation

    problems = load_problems(args.problems)
    samples = load_completions(args.completions, problems, args.problems)
    out = _output(Path(args.out or f"{args.completions}_results.jsonl"), (args.problems, args.completions))
    try:
        fh = open(out, "w")  # before scoring: a path we cannot write fails now, not after all the work
    except OSError as exc:
        raise ValueError(f"--out {out}: cannot write it ({exc.strerror}): give a writable path") from None
    with fh:
        broken = {t: d for t in dict.fromkeys(s["task_id"] for s in samples)
                  if (d := code.humaneval_defect(problems[t])) is not None}
        for task_id, defect in broken.items():
            print(f"problem {task_id!r} is broken ({defect}); its samples are infra, not scored", file=sys.stderr)
        limits = Limits(wall_s=args.timeout)
        isolation = detect_isolation()
        print(f"sandbox: {isolation.describe()}", file=sys.stderr)
        with ThreadPoolExecutor(args.workers) as pool:
            results = list(pool.map(lambda s: code.check_humaneval(problems[s["task_id"]], s["completion"],
                                                                   limits=limits, isolation=isolation), samples))
        for s, r in zip(samples, results):
            fh.write(json.dumps({"task_id": s["task_id"], **dataclasses.asdict(r)}) + "\n")
    per_task: dict[str | int, list[bool]] = defaultdict(list)
    infra_detail: dict[str | int, str] = {}
    for s, r in zip(samples, results):
        if r.kind == code.INFRA:
            infra_detail.setdefault(s["task_id"], r.detail)
        else:
            per_task[s["task_id"]].append(r.passed)
    unexpected = [detail for task_id, detail in infra_detail.items() if task_id not in broken]  # broken: named
    for detail in unexpected[:20]:
        print(f"infra: {detail}", file=sys.stderr)
    if len(unexpected) > 20:
        print(f"infra: ... and {len(unexpected) - 20} more tasks (see the per-sample results)", file=sys.stderr)
    infra = sum(r.kind == code.INFRA for r in results)
    for k in args.k:
        scores = [pass_at_k(len(v), sum(v), k) for v in per_task.values() if len(v) >= k]
        value = (f"{sum(scores) / len(scores):.4f}" if scores else
                 "n/a (fewer than k samples per task)" if per_task else "n/a (no scored samples)")
        print(f"pass@{k}: {value}")
    print(f"samples: {len(results)}, infra failures (not scored): {infra}; per-sample results: {out}")
    return 1 if infra else 0


def load_pairs(path: str) -> list[tuple[str, str]]:
    pairs = []
    for n, row in read_jsonl(path):
        prediction = _field(path, n, row, "prediction", (str, int, float), "a string (the model's text) or a number")
        answer = _field(path, n, row, "answer", (str, int, float), "a string (the gold answer) or a number")
        if not str(answer).strip():
            raise ValueError(f"{path}:{n}: field 'answer' is empty: give the gold answer")
        pairs.append((str(prediction), str(answer)))
    return pairs


def _math(args: argparse.Namespace) -> int:
    from posttrain.verifiers import math as math_verifier

    pairs = load_pairs(args.pairs)
    config = math_verifier.MathConfig(extract=args.extract, timeout_s=args.timeout)
    results = math_verifier.check_pairs(pairs, config)
    for n, r in enumerate(results, 1):
        print(json.dumps({"row": n, "correct": r.correct, "kind": r.kind, "extracted": r.extracted}))
    scored = [r for r in results if r.kind != "infra"]
    accuracy = sum(r.correct for r in scored) / len(scored) if scored else float("nan")
    print(f"accuracy: {accuracy:.4f} ({sum(r.correct for r in scored)}/{len(scored)}), "
          f"infra failures (not scored): {len(results) - len(scored)}")
    return 1 if len(scored) < len(results) else 0


def _k_values(text: str) -> tuple[int, ...]:
    try:
        ks = tuple(int(k) for k in text.split(","))
    except ValueError:
        ks = ()
    if not ks or min(ks) < 1:
        raise argparse.ArgumentTypeError(f"k values are whole numbers >= 1, comma-separated, e.g. 1,10 (got {text!r})")
    return ks


def _positive(convert: Callable[[str], float], what: str) -> Callable[[str], Any]:
    """An argparse type: ``convert(text)``, finite and > 0 (a whole number >= 1 for int), else a clear error."""
    def parse(text: str) -> Any:
        try:
            value = convert(text)
        except ValueError:
            value = math.nan
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"{what} (got {text!r})")
        return value

    return parse


_seconds = _positive(float, "a positive number of seconds, e.g. 10")
_workers = _positive(int, "a whole number >= 1")


def _extractors(text: str) -> tuple[str, ...]:
    from posttrain.verifiers.math import EXTRACTORS

    methods = tuple(m.strip() for m in text.split(","))
    if not all(m in EXTRACTORS for m in methods):
        raise argparse.ArgumentTypeError(f"a comma-separated subset of {','.join(EXTRACTORS)} (got {text!r})")
    return methods


def add_commands(subparsers: Any) -> None:
    """Register ``verify code`` and ``verify math`` on the ``posttrain`` parser."""
    p_verify = subparsers.add_parser("verify", help="score code or math answers (sandboxed)")
    sub = p_verify.add_subparsers(dest="verify_command", required=True, metavar="KIND")
    p_code = sub.add_parser("code", help="HumanEval-format problems + completions -> pass@k")
    p_code.add_argument("--problems", required=True, help="JSONL: task_id, prompt, test, entry_point")
    p_code.add_argument("--completions", required=True, help="JSONL: task_id, completion")
    p_code.add_argument("--k", type=_k_values, default=(1,), help="comma-separated k values for pass@k (default 1)")
    p_code.add_argument("--out", help="per-sample results JSONL (default COMPLETIONS_results.jsonl)")
    p_code.add_argument("--workers", type=_workers, default=2, help="programs run at once (default 2)")
    p_code.add_argument("--timeout", type=_seconds, default=10.0, help="wall seconds per program (default 10)")
    p_code.set_defaults(func=_code)
    p_math = sub.add_parser("math", help="JSONL of prediction/answer pairs -> accuracy")
    p_math.add_argument("--pairs", required=True, help="JSONL: prediction, answer")
    p_math.add_argument("--extract", type=_extractors, default=("boxed", "answer_is", "last_number"),
                        help="answer extractors, in order (default boxed,answer_is,last_number)")
    p_math.add_argument("--timeout", type=_seconds, default=6.0, help="hard seconds per check (default 6)")
    p_math.set_defaults(func=_math)
