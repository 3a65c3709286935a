"""`posttrain sft [--config F] [key=value ...] [--dry-run] [--resume]` and `posttrain sft preview`.

``preview`` shows rendered samples after the reasoning-budget transforms with the loss-carrying
tokens highlighted, so a reader sees exactly what the model is trained on.
"""

from __future__ import annotations

import argparse
import sys

from posttrain.config import describe, load_config, to_yaml
from posttrain.sft.config import SFTConfig


def _load(args: argparse.Namespace, overrides: list[str]) -> SFTConfig:
    return load_config(SFTConfig, args.config, overrides)


def _preview(args: argparse.Namespace, overrides: list[str]) -> int:
    from posttrain import models
    from posttrain.sft import data

    cfg = _load(args, overrides)
    tokenizer = models.tokenizer_for(cfg.model)
    rows = data.load_rows(cfg.data)
    data.check_rows(rows, cfg.data.messages_field)
    color = sys.stdout.isatty() and not args.plain
    marks = ("\x1b[42m", "\x1b[0m") if color else ("[[", "]]")
    shown = 0
    for i, row in enumerate(rows):
        example = data.make_example(i, row[cfg.data.messages_field], cfg.data, tokenizer)
        if args.mode and example.mode != args.mode:
            continue
        sample = data.tokenize(example, tokenizer)
        print(f"--- row {i} · {example.mode} · {len(sample.input_ids)} tokens, {sample.n_loss_tokens} with loss "
              f"({'highlighted' if color else 'inside [[ ]]'})")
        print(data.preview(sample, tokenizer, *marks))
        shown += 1
        if shown >= args.num:
            break
    return 0


def _sft(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if overrides and overrides[0] == "preview":
        return _preview(args, overrides[1:])
    if overrides and overrides[0] == "keys":
        print("\n".join(describe(SFTConfig)))
        return 0
    cfg = _load(args, overrides)
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    from posttrain.sft.train import train

    print(train(cfg, resume=args.resume, stop_after=args.stop_after))
    return 0


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sft", help="supervised fine-tuning (also: `sft preview`, `sft keys`)",
        description="posttrain sft [--config F] [key=value ...]: train. "
                    "posttrain sft preview [--config F] [key=value ...] [-n N] [--mode off|cut|full|plain]: "
                    "rendered samples with the loss mask. posttrain sft keys: every config key.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. train.lr=1e-5")
    p.add_argument("--config", help="YAML preset, e.g. configs/sft/smollm2_reasoning.yaml")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in run_dir")
    p.add_argument("--stop-after", type=int, metavar="STEP", help=(
        "end after this step's checkpoint, as a preempted run would (resume drills, tests)"))
    p.add_argument("-n", "--num", type=int, default=3, help="preview: samples to show")
    p.add_argument("--mode", choices=("full", "off", "cut", "plain"), help="preview: only this transform")
    p.add_argument("--plain", action="store_true", help="preview: mark loss spans with [[ ]] even on a terminal")
    p.set_defaults(func=_sft)
