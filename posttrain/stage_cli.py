"""What every stage command shares: `[--config F] [key=value ...] [--dry-run] [--resume]`, `keys`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from posttrain.config import describe, load_config, to_yaml


def add_config_arguments(p: argparse.ArgumentParser, example: str, *, resume: bool = True) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. run.steps=20 train.lr=1e-6; `keys` lists every key")
    p.add_argument("--config", help=f"YAML preset, e.g. {example}")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    if resume:
        p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")


def run_config_command(cls: type, args: argparse.Namespace, call: Callable[[Any], Any]) -> int:
    """`keys` lists the config's keys; else build it, print it (--dry-run) or run ``call(cfg)``
    and print its result as JSON when there is one."""
    if args.overrides[:1] == ["keys"]:
        print("\n".join(describe(cls)))
        return 0
    cfg = load_config(cls, args.config, list(args.overrides))
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    result = call(cfg)
    if result is not None:
        print(json.dumps(result, indent=1, sort_keys=True, default=str))
    return 0
