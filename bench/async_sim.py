"""What would asynchronous RL buy? The discrete-event model (posttrain.rlvr.async_plan) on measured phases.

Reads the median phase times of an RL run (``time/gen_s`` + ``time/score_s`` on the engines,
``time/train_s`` and ``time/sync_s`` on the trainer) and plays the synchronous loop (k = 0) against
bounded staleness k = 1, 2. On a CPU box an async run splits the cores between engines and trainer,
so each side is slower than in the time-shared synchronous loop: ``--split-slowdown F`` multiplies
every phase by F for the async rows (and a "sync, same split" row shows the loop with that split).
A sweep of generation:training ratios follows (illustrative; no step breakdown of the recipe's
cluster runs is published that we could find), next to the peers' published speed-ups.

    python bench/async_sim.py --run runs/p3/rlvr --split-slowdown 1.6
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from posttrain.rlvr.async_plan import Phases, simulate

PUBLISHED = ("NeMo-RL async (Llama-3.1-8B, 16 GPUs): 1.31x; verl one-step-off: 1.23-1.40x; "
             "verl fully async (128 GPUs): 2.35-2.67x")


def measured(run: Path) -> Phases:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = [r for r in rows if "time/gen_s" in r and "time/train_s" in r]
    if not steps:
        raise SystemExit(f"{run}: no step rows with time/gen_s and time/train_s")

    def median(key: str) -> float:
        return statistics.median(r.get(key, 0.0) for r in steps)

    return Phases(gen_s=median("time/gen_s") + median("time/score_s"), train_s=median("time/train_s"),
                  sync_s=median("time/sync_s"), load_s=0.0)


def row(name: str, phases: Phases, k: int, bases: tuple[float, float], steps: int, jitter: float) -> str:
    plan = simulate(phases, k, steps=steps, jitter=jitter)
    ups = " ".join(f"{plan.steps_per_hour / b:7.2f}x" for b in bases)
    return (f"{name:26} {plan.steps_per_hour:9.1f} {ups} {plan.mean_staleness:9.2f} "
            f"{100 * plan.trainer_idle:8.0f}% {100 * plan.engine_idle:8.0f}%")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, help="an RL stage folder (metrics.jsonl with time/* per step)")
    p.add_argument("--gen", type=float, help="seconds of generation + scoring per step (instead of --run)")
    p.add_argument("--train", type=float, help="seconds of training per step")
    p.add_argument("--sync", type=float, default=0.0, help="seconds of weight publishing per step")
    p.add_argument("--split-slowdown", type=float, default=1.0,
                   help="each phase's slowdown when engines and trainer get disjoint halves of the machine")
    p.add_argument("--jitter", type=float, default=0.15, help="lognormal sigma of every phase time")
    p.add_argument("--steps", type=int, default=500)
    args = p.parse_args()
    if args.run:
        phases = measured(args.run)
    elif args.gen is not None and args.train is not None:
        phases = Phases(args.gen, args.train, args.sync)
    else:
        raise SystemExit("give --run RUN, or --gen and --train")
    f = args.split_slowdown
    split = Phases(phases.gen_s * f, phases.train_s * f, phases.sync_s * f, phases.load_s * f)
    bases = (simulate(phases, 0, steps=args.steps, jitter=args.jitter).steps_per_hour,
             simulate(split, 0, steps=args.steps, jitter=args.jitter).steps_per_hour)
    print(f"phases per step: gen+score {phases.gen_s:.1f} s, train {phases.train_s:.1f} s, sync {phases.sync_s:.1f} s; "
          f"split slowdown x{f:g}")
    print(f"{'loop':26} {'steps/h':>9} {'vs sync':>8} {'vs split':>8} {'staleness':>9} {'trainer':>9} "
          f"{'engines':>9}  (idle)")
    print(row("sync, time-shared", phases, 0, bases, args.steps, args.jitter))
    print(row("sync, same split", split, 0, bases, args.steps, args.jitter))
    for k in (1, 2):
        print(row(f"async k={k}, split", split, k, bases, args.steps, args.jitter))
    print("\nsweep (generation : training, sync 5% of a step, no split slowdown):")
    print(f"{'gen:train':10} {'k=1':>7} {'k=2':>7}")
    for gen, train in ((4, 1), (3, 1), (2, 1), (1, 1), (1, 2)):
        ratio = Phases(float(gen), float(train), 0.05 * (gen + train))
        sync = simulate(ratio, 0, steps=args.steps, jitter=args.jitter).steps_per_hour
        ups = [simulate(ratio, k, steps=args.steps, jitter=args.jitter).steps_per_hour / sync for k in (1, 2)]
        print(f"{gen}:{train:<8} {ups[0]:6.2f}x {ups[1]:6.2f}x")
    print(f"\npublished: {PUBLISHED}")


if __name__ == "__main__":
    main()
