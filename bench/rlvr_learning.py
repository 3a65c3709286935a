"""Proof of learning: greedy held-out accuracy before and after an RLVR run, with the wall time.

    .venv/bin/python bench/rlvr_learning.py [--config configs/rlvr/smollm2_math.yaml] [--minutes 30]
                                            [--eval-prompts 200] [key=value ...]

Runs the real stage (Ray actors, vLLM rollouts, sandboxed verifiers) with ``run.eval_every``
so it evaluates before the first step and after the last one, stops after ``--minutes`` of
RL wall time, and prints both accuracies side by side from the run's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from posttrain.config import load_config
from posttrain.rlvr.config import RLVRConfig
from posttrain.rlvr.loop import main


def run(args: argparse.Namespace) -> None:
    cfg = load_config(RLVRConfig, args.config, [
        f"run.max_minutes={args.minutes}", f"run.eval_prompts={args.eval_prompts}", "run.steps=100000",
        f"run.eval_every={args.eval_every}", *args.overrides])
    start = time.monotonic()
    main(cfg, resume=args.resume)
    wall = time.monotonic() - start
    rows = [json.loads(line) for line in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
    first, last = evals[0], evals[-1]
    steps = max(r["step"] for r in rows)
    print(f"\nRLVR learning benchmark: {cfg.model.name}, {steps} steps, {wall / 60:.1f} min wall "
          f"(incl. start-up and evals), {cfg.run.prompts_per_step} prompts x {cfg.rollout.samples_per_prompt} samples")
    print(f"{'metric':36s} {'before':>8s} {'after':>8s} {'gain':>8s}")
    for key in sorted(k for k in first if k.startswith("eval/") and not k.endswith("/prompts")):
        print(f"{key:36s} {first[key]:8.3f} {last.get(key, float('nan')):8.3f} {last.get(key, 0) - first[key]:+8.3f}")
    step_times = [r["time/gen_s"] + r["time/score_s"] + r["time/train_s"] + r["time/sync_s"]
                  for r in rows if "time/gen_s" in r]
    if step_times:
        print(f"mean step {sum(step_times) / len(step_times):.1f} s over {len(step_times)} steps")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--config", default="configs/rlvr/smollm2_math.yaml")
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--eval-prompts", type=int, default=200)
    parser.add_argument("--eval-every", type=int, default=10 ** 6, help="intermediate evals (default: only ends)")
    parser.add_argument("--resume", action="store_true")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run(parser.parse_args())
