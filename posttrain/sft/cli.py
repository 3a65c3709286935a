"""`posttrain sft [--config F] [key=value ...] [--dry-run] [--resume]` and `posttrain sft preview`.

``preview`` shows rendered samples after the reasoning-budget transforms with the loss-carrying
tokens highlighted, so a reader sees exactly what the model is trained on.
"""

from __future__ import annotations

import argparse
import sys

from posttrain.config import load_config
from posttrain.sft.config import SFTConfig
from posttrain.stage_cli import add_config_arguments, overrides_of, run_config_command


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
        example = data.make_example(i, row[cfg.data.messages_field], cfg.data, tokenizer, row.get("tools"))
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


def _memory_plan(cfg: SFTConfig, args: argparse.Namespace) -> str:
    """The per-rank memory plan of this config (training/memory_plan.py), from the model's config only."""
    import os

    from posttrain.models import cache_root
    from posttrain.training import memory_plan as mp

    world = args.world or int(os.environ.get("WORLD_SIZE", "1"))
    device = mp.parse_bytes(args.device_memory) if args.device_memory else None
    return mp.stage_plan(cfg.model, cfg.train, cfg.lora, world, device, cache_root())


def _sft(args: argparse.Namespace) -> int:
    def call(cfg: SFTConfig) -> None:
        from posttrain.sft.train import train

        print(train(cfg, resume=args.resume, stop_after=args.stop_after))

    return run_config_command(SFTConfig, args, call, dry_run_extra=lambda cfg: _memory_plan(cfg, args))


def _preview_command(args: argparse.Namespace) -> int:
    return _preview(args, overrides_of(args))


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "sft", help="supervised fine-tuning (also: `sft preview`, `sft keys`)",
        description="posttrain sft [--config F] [key=value ...]: train. "
                    "posttrain sft preview [--config F] [key=value ...] [-n N] [--mode off|cut|full|plain]: "
                    "rendered samples with the loss mask. posttrain sft keys: every config key.")
    add_config_arguments(p, "configs/sft/smollm2_reasoning.yaml", ["train.lr=1e-5", "data.limit=100"], "sft")
    p.add_argument("--world", type=int, metavar="N", help=(
        "dry-run: processes the memory plan assumes (default: $WORLD_SIZE or 1), e.g. 32 for 4 nodes x 8 GPUs"))
    p.add_argument("--device-memory", metavar="SIZE", help=(
        "dry-run: memory per device, e.g. 80GB or 141GiB: the plan says whether a rank fits"))
    p.add_argument("--stop-after", type=int, metavar="STEP", help=(
        "end after this step's checkpoint, as a preempted run would (resume drills, tests)"))
    p.set_defaults(func=_sft)
    # `posttrain sft preview ...` is routed here by posttrain.cli (PREFIXED), so its --help is its own
    v = subparsers.add_parser("sft-preview", prog="posttrain sft preview", help=argparse.SUPPRESS,
                              description="rendered SFT samples after the reasoning-budget transforms, "
                                          "loss-carrying tokens highlighted")
    add_config_arguments(v, "configs/sft/smollm2_reasoning.yaml", ["data.limit=20", "data.reasoning_off_share=0.5"],
                         "sft", resume=False, dry_run=False)
    v.add_argument("-n", "--num", type=int, default=3, help="samples to show")
    v.add_argument("--mode", choices=("full", "off", "cut", "plain"), help="only this transform")
    v.add_argument("--plain", action="store_true", help="mark loss spans with [[ ]] even on a terminal")
    v.set_defaults(func=_preview_command)
