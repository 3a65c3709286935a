"""`posttrain rlvr [--config F] [key=value ...] [--dry-run] [--resume]`."""

from __future__ import annotations

import argparse
from typing import Any

from posttrain.rlvr.config import RLVRConfig
from posttrain.stage_cli import add_config_arguments, run_config_command


def _rlvr(args: argparse.Namespace) -> int:
    def call(cfg: RLVRConfig) -> Any:
        from posttrain.rlvr.loop import main

        return main(cfg, resume=args.resume)

    return run_config_command(RLVRConfig, args, call)


def add_commands(sub: Any) -> None:
    p = sub.add_parser("rlvr", help="GRPO on verifiable environments (vLLM rollouts, sandboxed verifiers)")
    add_config_arguments(p, "configs/rlvr/smollm2_math.yaml", ["run.steps=20", "train.lr=1e-6"], "rlvr")
    p.set_defaults(func=_rlvr)
