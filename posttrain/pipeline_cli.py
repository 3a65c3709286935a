"""`posttrain pipeline [--config F] [key=value ...] [--dry-run]`: the main job."""

from __future__ import annotations

import argparse
from typing import Any

from posttrain.stage_cli import add_config_arguments, run_config_command


def _pipeline(args: argparse.Namespace) -> int:
    from posttrain.pipeline import PipelineConfig, main, plan

    def call(cfg: PipelineConfig) -> None:
        main(cfg)  # prints the before/after table and the report's path

    return run_config_command(PipelineConfig, args, call, plan=plan)


def add_commands(sub: Any) -> None:
    p = sub.add_parser("pipeline", help="SFT -> RLVR -> GenRM -> RLHF as one Ray job, resumable, with a report")
    add_config_arguments(p, "configs/pipeline/smollm2.yaml", ["rlvr.run.max_minutes=3", "stages=[sft,rlvr]",
                                                              "loggers=[jsonl,tensorboard,wandb]"], "pipeline",
                         resume=False)
    p.set_defaults(func=_pipeline)
