"""Efficiency report of the RLVR loop: where a step's time goes, and generation speed inside
the loop next to the same engine standalone, in one run.

    .venv/bin/python bench/rlvr_step.py                                  # smollm2 preset, 4 steps
    .venv/bin/python bench/rlvr_step.py --config configs/rlvr/tiny_smoke.yaml --steps 3

(1) runs ``--steps`` real RL steps of the config (Ray actors, vLLM, verifiers, trainer, sync)
and prints the per-phase breakdown of each step and the mean; (2) starts a fresh rollout
pool with the same model, rollout and generation settings and times ``--repeats`` generate
calls of the same size (prompts x samples drawn from the same environments); (3) prints
in-loop tokens/s, standalone tokens/s and their ratio. The first RL step includes warm-up,
so the means skip it when there are more.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

from posttrain.config import load_config
from posttrain.rlvr.config import RLVRConfig

PHASES = ("gen", "score", "train", "sync")


def in_loop(cfg: RLVRConfig) -> list[dict[str, float]]:
    from posttrain.rlvr.loop import main

    main(cfg)
    rows = [json.loads(x) for x in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "time/gen_s" in r]


def standalone(cfg: RLVRConfig, repeats: int) -> tuple[int, float]:
    """(tokens, seconds) of the fastest generate call of one step's size on a fresh pool."""
    from posttrain.environments.registry import opened
    from posttrain.rollout.pool import RolloutPool

    prompts = []
    with opened(cfg.environments) as envs:
        for env in envs.values():
            prompts += [s.messages for s in env.samples("train", cfg.run.seed)]
    prompts = prompts[: cfg.run.prompts_per_step]
    pool = RolloutPool(cfg.model, cfg.rollout)
    try:
        best = (0, float("inf"))
        for i in range(repeats):
            gen = cfg.generation.model_copy(update={"seed": cfg.generation.seed + 17 * (i + 1)})
            start = time.perf_counter()
            groups = pool.generate(prompts, gen, cfg.rollout.samples_per_prompt)
            seconds = time.perf_counter() - start
            tokens = sum(len(r.token_ids) for g in groups for r in g)
            if best[1] == float("inf") or tokens / seconds > best[0] / best[1]:
                best = (tokens, seconds)
        return best
    finally:
        pool.shutdown()


def report(steps: list[dict[str, float]], alone: tuple[int, float]) -> None:
    print(f"\n{'step':>4s} " + " ".join(f"{p + '_s':>8s}" for p in PHASES) + f" {'total_s':>8s} {'gen%':>6s} "
          f"{'tokens':>7s} {'gen tok/s':>9s}")
    for i, r in enumerate(steps, 1):
        total = sum(r[f"time/{p}_s"] for p in PHASES)
        print(f"{i:4d} " + " ".join(f"{r[f'time/{p}_s']:8.2f}" for p in PHASES) + f" {total:8.2f} "
              f"{100 * r['time/gen_s'] / total:5.1f}% {r.get('rollout/gen_tokens', 0):7.0f} "
              f"{r['throughput/gen_tokens_per_s']:9.1f}")
    warm = steps[1:] if len(steps) > 1 else steps
    mean = {p: statistics.mean(r[f"time/{p}_s"] for r in warm) for p in PHASES}
    total = sum(mean.values())
    print("mean " + " ".join(f"{mean[p]:8.2f}" for p in PHASES) + f" {total:8.2f}   (steps 2.. when more than one)")
    print("share " + " ".join(f"{100 * mean[p] / total:7.1f}%" for p in PHASES))
    loop_tps = statistics.mean(r["throughput/gen_tokens_per_s"] for r in warm)
    alone_tps = alone[0] / alone[1]
    print(f"\ngeneration tokens/s: in loop {loop_tps:.1f}, standalone engine {alone_tps:.1f} "
          f"({alone[0]} tokens in {alone[1]:.2f} s); ratio in-loop/standalone = {loop_tps / alone_tps:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--config", default="configs/rlvr/smollm2_math.yaml")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_dir = tempfile.mkdtemp(prefix="rlvr-step-")
    config = load_config(RLVRConfig, args.config, [f"run.steps={args.steps}", f"run_dir={run_dir}",
                                                   f"run.save_every={10 ** 6}", *args.overrides])
    report(in_loop(config), standalone(config, args.repeats))
