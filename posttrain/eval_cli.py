"""`posttrain eval [--model M] [--config F] [key=value ...] [--dry-run]`: held-out accuracy of any model."""

from __future__ import annotations

import argparse
import json
from typing import Any

from posttrain.held_out import EvalConfig
from posttrain.stage_cli import add_config_arguments, run_config_command


def _eval(args: argparse.Namespace) -> int:
    def call(cfg: EvalConfig) -> None:
        from posttrain.atomic import atomic_write_text
        from posttrain.held_out import format_table, run_eval

        result = run_eval(cfg)
        print(format_table(result))
        if cfg.out:
            atomic_write_text(cfg.out, json.dumps({"model": cfg.model.name, "metrics": result}, indent=1) + "\n")
            print(f"written: {cfg.out}")

    return run_config_command(EvalConfig, args, call, flags=[f"model.name={args.model}"] if args.model else [])


def add_commands(sub: Any) -> None:
    p = sub.add_parser("eval", help="held-out accuracy of a model on environments' test splits "
                                    "(greedy, thinking on/off, pass@k)")
    add_config_arguments(p, "configs/eval/smollm2_math.yaml", ["prompts=50", "pass_k=[1,4]", "out=eval.json"], "eval",
                         resume=False)
    p.add_argument("--model", help="built-in name, hub id or local folder (= model.name=...)")
    p.set_defaults(func=_eval)
