"""`posttrain pipeline [--config F] [key=value ...] [--dry-run]`: the main job."""

from __future__ import annotations

import argparse
from typing import Any

from posttrain.config import describe, load_config, to_yaml


def _pipeline(args: argparse.Namespace) -> int:
    from posttrain.pipeline import PipelineConfig

    if args.overrides[:1] == ["keys"]:
        print("\n".join(describe(PipelineConfig)))
        return 0
    cfg = load_config(PipelineConfig, args.config, list(args.overrides))
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    from posttrain.pipeline import main

    main(cfg)
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("pipeline", help="SFT -> RLVR -> GenRM -> RLHF as one Ray job, resumable, with a report")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. rlvr.run.steps=5 stages=[sft,rlvr]; `keys` lists every key")
    p.add_argument("--config", help="YAML preset, e.g. configs/pipeline/smollm2.yaml")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    p.set_defaults(func=_pipeline)
