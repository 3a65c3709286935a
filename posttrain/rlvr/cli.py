"""`posttrain rlvr [--config F] [key=value ...] [--dry-run] [--resume]`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from posttrain.config import describe, load_config, to_yaml
from posttrain.rlvr.config import RLVRConfig


def _rlvr(args: argparse.Namespace) -> int:
    if args.overrides[:1] == ["keys"]:
        print("\n".join(describe(RLVRConfig)))
        return 0
    cfg = load_config(RLVRConfig, args.config, list(args.overrides))
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    from posttrain.rlvr.loop import main

    print(json.dumps(main(cfg, resume=args.resume), indent=1, sort_keys=True))
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("rlvr", help="GRPO on verifiable environments (vLLM rollouts, sandboxed verifiers)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. run.steps=20 train.lr=1e-6; `keys` lists every key")
    p.add_argument("--config", help="YAML preset, e.g. configs/rlvr/smollm2_math.yaml")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.set_defaults(func=_rlvr)
