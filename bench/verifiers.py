"""Verifier benchmark: our sandbox vs a bare ``python3`` subprocess, and math checks per second.

    python bench/verifiers.py [--runs 30] [--programs 100]

Prints the isolation line (seccomp filter, cgroup caps incl. CPU, what is missing) and one
table: per-execution median ms (bare ``python3 -c pass`` vs a sandboxed program with one test
call, all protections on), the same without the per-run cgroup, programs/s on 2 workers (the
same small test programs run bare and sandboxed), and math-verify checks/s in one killable
worker. Targets (issues "Verifiers", #15): overhead <= 2x bare, >= 30 programs/s on 2 cores;
the last line says whether they were met. An infrastructure failure is an error here.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

os.environ.setdefault("OMP_NUM_THREADS", "1")

from posttrain.verifiers.code import INFRA, check_function  # noqa: E402
from posttrain.verifiers.math import MathChecker  # noqa: E402
from posttrain.verifiers.sandbox import Isolation, detect_isolation  # noqa: E402

PROGRAM = "def add(a, b):\n    return a + b\n"
TEST = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-4, 4) == 0\n"
MATH = [("\\boxed{\\frac{1}{2}}", "0.5"), ("the answer is 12", "12"), ("\\boxed{x^2+1}", "1+x^2"), ("7", "8")]


def _paired_ms(fns: list[Callable[[], object]], runs: int) -> list[float]:
    """Median ms of each function, run interleaved so they share the same machine load."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, out in zip(fns, times):
            start = time.perf_counter()
            fn()
            out.append((time.perf_counter() - start) * 1000)
    return [statistics.median(t) for t in times]


def bare_once(python: str, code: str = "pass") -> None:
    subprocess.run([python, "-c", code], check=True, stdout=subprocess.DEVNULL)


def sandbox_once(_: object = None, isolation: Isolation | None = None) -> bool:
    result = check_function(PROGRAM, "add", TEST, isolation=isolation)
    if result.kind == INFRA:
        raise SystemExit(f"sandbox could not run (infrastructure failure, not a score): {result.detail}")
    return result.passed


def per_second(fn: Callable[[int], object], n: int, workers: int = 2) -> float:
    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(fn, range(n)))
    return n / (time.perf_counter() - start)


def math_per_second(n: int) -> float:
    with MathChecker() as checker:
        checker.check("\\boxed{1}", "1")  # start the worker outside the timing
        start = time.perf_counter()
        for i in range(n):
            prediction, gold = MATH[i % len(MATH)]
            if checker.check(prediction, gold).kind == "infra":
                raise SystemExit("math checker failed (infrastructure)")
        return n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="runs per median (default 30)")
    parser.add_argument("--programs", type=int, default=100, help="programs for the throughput rows (default 100)")
    parser.add_argument("--math", type=int, default=100, help="math checks (default 100)")
    args = parser.parse_args()
    isolation = detect_isolation()
    python = isolation.python
    full = PROGRAM + TEST + "check(add)\n"
    sandbox_once()  # warm-up (isolation probe, page cache)
    no_cgroup = dataclasses.replace(isolation, cgroup=None, cpu_cap=False)
    bare_ms, bare_prog_ms, ours_ms, nocg_ms = _paired_ms(
        [lambda: bare_once(python), lambda: bare_once(python, full), sandbox_once,
         lambda: sandbox_once(isolation=no_cgroup)], args.runs)
    bare_rate = per_second(lambda _: bare_once(python, full), args.programs)
    ours_rate = per_second(sandbox_once, args.programs)
    math_rate = math_per_second(args.math)
    print(f"isolation: {isolation.describe()}   cpus: {os.cpu_count()}   python: {python}")
    print(f"{'metric':44s} {'bare subprocess':>16s} {'our sandbox':>12s} {'ratio':>7s}")
    ratio = ours_ms / bare_ms
    print(f"{'per run, median ms (bare: python3 -c pass)':44s} {bare_ms:16.1f} {ours_ms:12.1f} {ratio:6.2f}x")
    print(f"{'per run, median ms (bare: same test program)':44s} {bare_prog_ms:16.1f} {ours_ms:12.1f} "
          f"{ours_ms / bare_prog_ms:6.2f}x")
    if isolation.cgroup:
        print(f"{'per run, median ms, sandbox without cgroup':44s} {bare_ms:16.1f} {nocg_ms:12.1f} "
              f"{nocg_ms / bare_ms:6.2f}x")
    print(f"{'small test programs/s, 2 workers':44s} {bare_rate:16.1f} {ours_rate:12.1f} {ours_rate / bare_rate:6.2f}x")
    print(f"{'math-verify checks/s, 1 worker process':44s} {'':>16s} {math_rate:12.1f}")
    verdict = {True: "met", False: "MISSED"}
    print(f"targets: per run <= 2x bare {verdict[ratio <= 2.0]} ({ratio:.2f}x); "
          f">= 30 programs/s on 2 workers {verdict[ours_rate >= 30]} ({ours_rate:.1f}/s)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
