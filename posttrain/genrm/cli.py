"""`posttrain rlhf …`, `posttrain genrm train …`, `posttrain genrm eval …`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from posttrain.config import describe, load_config, to_yaml


def _run(cls: type, args: argparse.Namespace, call: Any) -> int:
    if args.overrides[:1] == ["keys"]:
        print("\n".join(describe(cls)))
        return 0
    cfg = load_config(cls, args.config, list(args.overrides))
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    print(json.dumps(call(cfg, args), indent=1, sort_keys=True))
    return 0


def _rlhf(args: argparse.Namespace) -> int:
    from posttrain.genrm.config import RLHFConfig

    def call(cfg: Any, a: argparse.Namespace) -> Any:
        from posttrain.rlvr.loop import main

        return main(cfg, resume=a.resume, stage="rlhf")

    return _run(RLHFConfig, args, call)


def _train(args: argparse.Namespace) -> int:
    from posttrain.genrm.config import GenRMTrainConfig

    def call(cfg: Any, a: argparse.Namespace) -> Any:
        from posttrain.genrm.train import train

        return train(cfg, resume=a.resume)

    return _run(GenRMTrainConfig, args, call)


def _eval(args: argparse.Namespace) -> int:
    from posttrain.genrm.config import GenRMEvalConfig

    if args.model:
        args.overrides = [f"model.name={args.model}", *args.overrides]

    def call(cfg: Any, a: argparse.Namespace) -> Any:
        from posttrain.genrm.train import evaluate

        return evaluate(cfg)

    return _run(GenRMEvalConfig, args, call)


def _common(p: argparse.ArgumentParser, example: str, resume: bool = True) -> None:
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides; `keys` lists every key")
    p.add_argument("--config", help=f"YAML preset, e.g. {example}")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    if resume:
        p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")


def add_commands(sub: Any) -> None:
    p = sub.add_parser("rlhf", help="RL against a GenRM (circular pairwise judging), optionally mixed with RLVR envs")
    _common(p, "configs/rlhf/smollm2_genrm.yaml")
    p.set_defaults(func=_rlhf)
    g = sub.add_parser("genrm", help="train or evaluate a generative reward model")
    gsub = g.add_subparsers(dest="genrm_command", required=True)
    t = gsub.add_parser("train", help="SFT warm-up (optional) + RL on preference labels")
    _common(t, "configs/genrm/smollm2_pref.yaml")
    t.set_defaults(func=_train)
    e = gsub.add_parser("eval", help="pairwise accuracy and score errors on held-out preference pairs")
    e.add_argument("--model", help="the GenRM: hub id, model folder, or built-in name")
    _common(e, "configs/genrm/eval.yaml", resume=False)
    e.set_defaults(func=_eval)
