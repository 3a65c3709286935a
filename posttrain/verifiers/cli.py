"""``posttrain verify code|math``: score files in the formats people already use.

- ``verify code --problems P.jsonl --completions C.jsonl [--k 1,10]``: HumanEval records
  (``task_id``, ``prompt``, ``test``, ``entry_point``) and completions (``task_id``,
  ``completion``); prints pass@k (the unbiased estimator) and writes per-sample JSONL.
- ``verify math --pairs F.jsonl`` (``prediction``, ``answer``): prints accuracy, per-row verdicts.

Infrastructure failures are counted and printed apart, never scored as failures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from math import comb
from pathlib import Path
from typing import Any


def read_jsonl(path: str) -> Iterator[dict[str, Any]]:
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n} is not JSON ({exc.msg}): one object per line") from None


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of a task with ``n`` samples, ``c`` correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def _code(args: argparse.Namespace) -> int:
    from posttrain.verifiers.code import INFRA, check_humaneval
    from posttrain.verifiers.sandbox import Limits, detect_isolation

    problems = {p["task_id"]: p for p in read_jsonl(args.problems)}
    samples = list(read_jsonl(args.completions))
    for s in samples:
        if s.get("task_id") not in problems:
            raise ValueError(f"completion for task_id {s.get('task_id')!r} has no problem in {args.problems}")
    ks = [int(k) for k in args.k.split(",")]
    limits = Limits(wall_s=args.timeout)
    isolation = detect_isolation()
    print(f"sandbox: {isolation.describe()}", file=sys.stderr)
    with ThreadPoolExecutor(args.workers) as pool:
        results = list(pool.map(lambda s: check_humaneval(problems[s["task_id"]], s["completion"], limits=limits,
                                                          isolation=isolation), samples))
    per_task: dict[str, list[bool]] = defaultdict(list)
    out = Path(args.out or f"{args.completions}_results.jsonl")
    with open(out, "w") as fh:
        for s, r in zip(samples, results):
            fh.write(json.dumps({"task_id": s["task_id"], **dataclasses.asdict(r)}) + "\n")
            if r.kind != INFRA:
                per_task[s["task_id"]].append(r.passed)
    infra = sum(r.kind == INFRA for r in results)
    for k in ks:
        scores = [pass_at_k(len(v), sum(v), k) for v in per_task.values() if len(v) >= k]
        value = f"{sum(scores) / len(scores):.4f}" if scores else "n/a (fewer than k samples per task)"
        print(f"pass@{k}: {value}")
    print(f"samples: {len(results)}, infra failures (not scored): {infra}; per-sample results: {out}")
    return 1 if infra else 0


def _math(args: argparse.Namespace) -> int:
    from posttrain.verifiers.math import MathConfig, check_pairs

    rows = list(read_jsonl(args.pairs))
    for n, row in enumerate(rows, 1):
        if "prediction" not in row or "answer" not in row:
            raise ValueError(f"{args.pairs} row {n} needs 'prediction' and 'answer' (has {sorted(row)})")
    config = MathConfig(extract=tuple(args.extract.split(",")), timeout_s=args.timeout)
    results = check_pairs([(str(r["prediction"]), str(r["answer"])) for r in rows], config)
    for n, r in enumerate(results, 1):
        print(json.dumps({"row": n, "correct": r.correct, "kind": r.kind, "extracted": r.extracted}))
    scored = [r for r in results if r.kind != "infra"]
    accuracy = sum(r.correct for r in scored) / len(scored) if scored else float("nan")
    print(f"accuracy: {accuracy:.4f} ({sum(r.correct for r in scored)}/{len(scored)}), "
          f"infra failures (not scored): {len(results) - len(scored)}")
    return 1 if len(scored) < len(results) else 0


def add_commands(subparsers: Any) -> None:
    """Register ``verify code`` and ``verify math`` on the ``posttrain`` parser."""
    p_verify = subparsers.add_parser("verify", help="score code or math answers (sandboxed)")
    sub = p_verify.add_subparsers(dest="verify_command", required=True, metavar="KIND")
    p_code = sub.add_parser("code", help="HumanEval-format problems + completions -> pass@k")
    p_code.add_argument("--problems", required=True, help="JSONL: task_id, prompt, test, entry_point")
    p_code.add_argument("--completions", required=True, help="JSONL: task_id, completion")
    p_code.add_argument("--k", default="1", help="comma-separated k values for pass@k (default 1)")
    p_code.add_argument("--out", help="per-sample results JSONL (default COMPLETIONS_results.jsonl)")
    p_code.add_argument("--workers", type=int, default=2, help="programs run at once (default 2)")
    p_code.add_argument("--timeout", type=float, default=10.0, help="wall seconds per program (default 10)")
    p_code.set_defaults(func=_code)
    p_math = sub.add_parser("math", help="JSONL of prediction/answer pairs -> accuracy")
    p_math.add_argument("--pairs", required=True, help="JSONL: prediction, answer")
    p_math.add_argument("--extract", default="boxed,answer_is,last_number",
                        help="answer extractors, in order (default boxed,answer_is,last_number)")
    p_math.add_argument("--timeout", type=float, default=6.0, help="hard seconds per check (default 6)")
    p_math.set_defaults(func=_math)
