"""Scalar reward model vs GenRM: held-out pairwise accuracy for the same base model and training time.

The GenRM is a finished ``genrm`` stage (``--genrm-run``: a pipeline's ``RUN/genrm`` or a
``posttrain genrm train`` folder). Its training time is read from its own metrics: from the
row that logged its base judge evaluation (step 0) to its last training step. A Bradley-Terry
reward model is then trained from the same base model on the same pairs for that long
(``train.max_minutes``; ``configs/rm/smollm2_pref.yaml``), and both are measured on the same
held-out pairs:

(a) the scalar RM: chosen scored above rejected (one forward pass per response);
(b) the GenRM by its written verdicts, per judgement (each pair judged in both orders);
(c) the GenRM by expected scores, each pair decided by its two judgements together (as RLHF with
    ``both_orders`` reads it).

One greedy judge pass with top log-probs serves (b) and (c). Standard errors are binomial
(sqrt(p(1-p)/n) over the n decided pairs or verdicts). Run alone: the RM trains on every core.

    python bench/rm_vs_genrm.py --genrm-run runs/p3/genrm
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import yaml

from posttrain.config import load_config
from posttrain.genrm.config import GenRMTrainConfig
from posttrain.genrm.preference_data import SHIPPED, load_pairs
from posttrain.genrm.train import judge_calls, judge_eval_config, verdict_metrics
from posttrain.preference.config import RMStageConfig

CONFIGS = Path(__file__).parents[1] / "configs"
N_ROLLOUTS = 16


def genrm_training_minutes(run: Path) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    start = next(r["time"] for r in rows if r["step"] == 0 and "eval/genrm_judge/prompts" in r)
    trained = [r["time"] for r in rows if r["step"] > 0 and not any(k.startswith("eval/genrm_judge/") for k in r)]
    return (max(trained) - start) / 60


def se(p: float, n: float) -> float:
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--genrm-run", type=Path, required=True, help="a finished GenRM stage folder (config.yaml, model/)")
    p.add_argument("--minutes", type=float, help="RM training budget (default: the GenRM's training time)")
    p.add_argument("--rm-run", default="runs/bench-rm", help="the RM's run folder (resumed if it exists)")
    p.add_argument("--pairs", type=int, default=200, help="held-out pairs")
    p.add_argument("overrides", nargs="*", help="RM config overrides (key=value)")
    args = p.parse_args()

    genrm_cfg = GenRMTrainConfig.model_validate(yaml.safe_load((args.genrm_run / "config.yaml").read_text()))
    genrm_minutes = genrm_training_minutes(args.genrm_run)
    minutes = args.minutes or genrm_minutes
    # the GenRM's preference data (its genrm_preference environment): the RM trains and is tested on the same
    env = next(e for e in genrm_cfg.environments if e.name == "genrm_preference")
    data = {"path": env.options.get("source", SHIPPED), "test_path": env.options.get("test_source")}
    rm_cfg = load_config(RMStageConfig, CONFIGS / "rm" / "smollm2_pref.yaml", [
        f"model.name={genrm_cfg.model.name}", f"train.max_minutes={minutes}", f"data.test_limit={args.pairs}",
        f"data.path={data['path']}", f"data.test_path={data['test_path'] or 'null'}", f"run_dir={args.rm_run}", *args.overrides])
    print(f"GenRM: {args.genrm_run} (base {genrm_cfg.model.name}), trained {genrm_minutes:.1f} min; "
          f"RM budget {minutes:.1f} min", flush=True)

    from posttrain.preference.rm_train import train

    train(rm_cfg, resume=(Path(args.rm_run) / "checkpoints").is_dir())  # a finished run: nothing to do
    rows = [json.loads(x) for x in (Path(args.rm_run) / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/rm/pairwise_accuracy" in r]
    before, after = evals[0], evals[-1]
    steps = max(r["step"] for r in rows)
    rm_seconds = max(r["time"] for r in rows if "train/loss" in r) - before["time"]  # as for the GenRM

    pairs = load_pairs(data["test_path"] or data["path"], "test", limit=args.pairs)
    judge = judge_eval_config(genrm_cfg, str(args.genrm_run / "model")).model_copy(update={"scoring": "expected"})
    start = time.perf_counter()
    shown, calls = judge_calls(judge, pairs)
    judge_seconds = time.perf_counter() - start
    written = verdict_metrics(judge, shown, calls, "generate")
    expected = verdict_metrics(judge, shown, calls, "expected")

    rm_acc, n = after["eval/rm/pairwise_accuracy"], after["eval/rm/n_pairs"]
    table = [
        ("(a) scalar RM (Bradley-Terry, TRL)", rm_acc, se(rm_acc, n), int(n), f"{N_ROLLOUTS} forward passes"),
        ("    untrained RM head (step 0)", before["eval/rm/pairwise_accuracy"],
         se(before["eval/rm/pairwise_accuracy"], n), int(n), ""),
        ("(b) GenRM, written verdicts", written.get("pairwise_accuracy", float("nan")),
         se(written.get("pairwise_accuracy", 0.5), written["n_decided"]), int(written["n_decided"]),
         f"{N_ROLLOUTS} generations (circle)"),
        ("(c) GenRM, expected, both orders", expected["pairwise_accuracy_both_orders"],
         se(expected["pairwise_accuracy_both_orders"], len(pairs)), len(pairs),
         f"{2 * N_ROLLOUTS} generations (circle x 2)"),
    ]
    print(f"\nheld-out pairs: {len(pairs)} (shipped test split); RM trained {rm_seconds / 60:.1f} min "
          f"({steps} steps of {rm_cfg.train.batch_size} pairs); GenRM judged {len(calls)} calls in {judge_seconds:.0f} s")
    print(f"{'reward':38} {'accuracy':>9} {'+- SE':>7} {'n':>5}   calls per RLHF step (N={N_ROLLOUTS})")
    for name, acc, err, count, calls_text in table:
        print(f"{name:38} {acc:9.3f} {err:7.3f} {count:5d}   {calls_text}")
    print(f"{'chance':38} {0.5:9.3f}")
    print(f"GenRM written verdicts readable: {written['n_readable']:.0f} of {written['n_judgements']:.0f}; "
          f"expected values read: {expected.get('expected_values_rate', 0):.2f}")
    cats = sorted({k.rsplit("/", 1)[1] for k in after if k.startswith("eval/rm/pairwise_accuracy/")})
    if cats:
        print(f"\nper category {'RM':>8} {'GenRM (written)':>16}")
        for c in cats:
            print(f"{c:12} {after['eval/rm/pairwise_accuracy/' + c]:8.3f} "
                  f"{written.get('pairwise_accuracy/' + c, float('nan')):16.3f}")


if __name__ == "__main__":
    main()
