"""`posttrain dpo [--config F] [key=value ...] [--dry-run] [--resume]`."""

from __future__ import annotations

import argparse
from typing import Any

from posttrain.stage_cli import add_config_arguments, run_config_command


def _dpo(args: argparse.Namespace) -> int:
    from posttrain.preference.config import DPOStageConfig

    def call(cfg: DPOStageConfig) -> None:
        from posttrain.preference.dpo import train

        print(train(cfg, resume=args.resume))

    return run_config_command(DPOStageConfig, args, call)


def add_commands(sub: Any) -> None:
    p = sub.add_parser("dpo", help="DPO on preference pairs (TRL DPOTrainer), in our run folder")
    add_config_arguments(p, "configs/dpo/smollm2_pref.yaml", ["dpo.beta=0.2", "dpo.loss_type=[ipo]", "train.lr=1e-6"],
                         "dpo")
    p.set_defaults(func=_dpo)
