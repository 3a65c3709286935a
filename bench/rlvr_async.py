"""Synchronous vs asynchronous RL on this machine, side by side: steps per hour, idle time, accuracy.

    .venv/bin/python bench/rlvr_async.py [--minutes 30] [--only sync-shared async-k1 ...] [key=value ...]

Runs the learning bench's task (``configs/rlvr/smollm2_math.yaml``: SmolLM2-135M on arithmetic) four
times, each for ``--minutes`` of RL, one after another (alone on the machine):

- ``sync-shared``: the synchronous loop, engine and trainer each given every core (they take turns);
- ``sync-split``: the synchronous loop with half the cores each (the async runs' split);
- ``async-k1`` / ``async-k2``: ``run.max_staleness`` 1 and 2, half the cores each (the trainer keeps
  to the cores after the engine's);
- ``async-k1-inflight`` (only when named in ``--only``): k=1 with ``run.segment_tokens=16``, in-flight
  weight updates.

Each run is its own process (``posttrain rlvr``) with held-out greedy accuracy before the first step
and after the last. Printed: steps, steps per hour over the RL wall time, the engines' and trainer's
idle shares, and the final accuracy with its standard error; the speed-up is against ``sync-split``
(the same cores) and ``sync-shared``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

RUNS = {  # name: overrides
    "sync-shared": ["run.max_staleness=0", "rollout.threads_per_engine={all}", "train.threads={all}"],
    "sync-split": ["run.max_staleness=0", "rollout.threads_per_engine={half}", "train.threads={half}"],
    "async-k1": ["run.max_staleness=1", "rollout.threads_per_engine={half}", "train.threads={half}"],
    "async-k2": ["run.max_staleness=2", "rollout.threads_per_engine={half}", "train.threads={half}"],
    # in-flight updates: the k=1 run with generations cut every 16 tokens (a sync lands inside them)
    "async-k1-inflight": ["run.max_staleness=1", "run.segment_tokens=16", "rollout.threads_per_engine={half}",
                          "train.threads={half}"],
}
DEFAULT = ["sync-shared", "sync-split", "async-k1", "async-k2"]


def launch(name: str, args: argparse.Namespace) -> Path:
    cores = os.cpu_count() or 2
    run_dir = Path(args.out) / name
    overrides = [o.format(all=cores, half=max(1, cores // 2)) for o in RUNS[name]]
    cmd = [sys.executable, "-m", "posttrain", "rlvr", "--config", args.config, f"run_dir={run_dir}",
           f"run.max_minutes={args.minutes}", "run.steps=100000", "run.eval_every=1000000",
           f"run.eval_prompts={args.eval_prompts}", "run.save_every=1000000", *overrides, *args.overrides]
    if (run_dir / "model" / "config.json").is_file():
        print(f"{name}: already done ({run_dir})", flush=True)
        return run_dir
    print(f"{name}: {' '.join(cmd[3:])}", flush=True)
    with open(Path(args.out) / f"{name}.log", "w") as out:
        subprocess.run(cmd, check=True, stdout=out, stderr=subprocess.STDOUT)
    return run_dir


def summary(run_dir: Path, eval_prompts: int) -> dict[str, float]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in rows if "time/train_s" in r]
    start = next(r["time"] for r in rows if r["step"] == 0)  # after the starting eval
    last_train = max(steps, key=lambda r: r["step"])
    evals = [r for r in rows if "eval/math/accuracy" in r]
    # the last row's time includes the final eval: take the RL time up to the last step's own end
    rl_s = last_train["time"] - start - _eval_seconds(rows)
    acc = evals[-1]["eval/math/accuracy"]
    out = {"steps": float(len(steps)), "rl_min": rl_s / 60, "steps_per_h": 3600 * len(steps) / rl_s,
           "acc_before": evals[0]["eval/math/accuracy"], "acc": acc,
           "acc_se": math.sqrt(acc * (1 - acc) / eval_prompts)}
    if "async/engine_idle_share" in last_train:
        out["engine_idle"], out["trainer_idle"] = last_train["async/engine_idle_share"], last_train["async/trainer_idle_share"]
    else:
        gen = sum(r.get("time/gen_s", 0) + r.get("time/score_s", 0) for r in steps)
        train = sum(r.get("time/train_s", 0) + r.get("time/sync_s", 0) for r in steps)
        out["engine_idle"], out["trainer_idle"] = max(0.0, 1 - gen / rl_s), max(0.0, 1 - train / rl_s)
    return out


def _eval_seconds(rows: list[dict]) -> float:
    """The final eval's seconds, logged in the last step's row (``time/eval_s``) when the loop records it."""
    return sum(r.get("time/eval_s", 0.0) for r in rows if r["step"] > 0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", help="key=value for every run")
    p.add_argument("--config", default="configs/rlvr/smollm2_math.yaml")
    p.add_argument("--minutes", type=float, default=30.0, help="RL wall time of each run")
    p.add_argument("--eval-prompts", type=int, default=200)
    p.add_argument("--only", nargs="+", choices=list(RUNS), default=DEFAULT)
    p.add_argument("--out", default="runs/bench-async")
    args = p.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = {name: summary(launch(name, args), args.eval_prompts) for name in args.only}
    print(f"\nRLVR sync vs async, {args.minutes:g} min of RL each, {os.cpu_count()} cores ({args.config})")
    print(f"{'run':17} {'steps':>6} {'steps/h':>8} {'vs split':>8} {'vs shared':>9} {'engine idle':>11} "
          f"{'trainer idle':>12} {'accuracy (before -> after +- SE)':>34}")
    for name, r in results.items():
        ups = [f"{r['steps_per_h'] / results[b]['steps_per_h']:7.2f}x" if b in results else "      -"
               for b in ("sync-split", "sync-shared")]
        print(f"{name:17} {r['steps']:6.0f} {r['steps_per_h']:8.1f} {ups[0]:>8} {ups[1]:>9} "
              f"{100 * r['engine_idle']:10.0f}% {100 * r['trainer_idle']:11.0f}% "
              f"{r['acc_before']:14.3f} -> {r['acc']:.3f} +- {r['acc_se']:.3f}")


if __name__ == "__main__":
    main()
