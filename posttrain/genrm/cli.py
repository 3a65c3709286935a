"""`posttrain rlhf …`, `posttrain genrm train …`, `posttrain genrm eval …`."""

from __future__ import annotations

import argparse
from typing import Any

from posttrain.stage_cli import add_config_arguments, run_config_command


def _rlhf(args: argparse.Namespace) -> int:
    from posttrain.genrm.config import RLHFConfig

    def call(cfg: RLHFConfig) -> Any:
        from posttrain.rlvr.loop import main

        return main(cfg, resume=args.resume, stage="rlhf")

    return run_config_command(RLHFConfig, args, call)


def _train(args: argparse.Namespace) -> int:
    from posttrain.genrm.config import GenRMTrainConfig

    def call(cfg: GenRMTrainConfig) -> Any:
        from posttrain.genrm.train import train

        return train(cfg, resume=args.resume)

    return run_config_command(GenRMTrainConfig, args, call)


def _eval(args: argparse.Namespace) -> int:
    from posttrain.genrm.config import GenRMEvalConfig
    from posttrain.genrm.train import evaluate

    return run_config_command(GenRMEvalConfig, args, evaluate, flags=[f"model.name={args.model}"] if args.model else [])


def add_commands(sub: Any) -> None:
    p = sub.add_parser("rlhf", help="RL against a GenRM (circular pairwise judging), optionally mixed with RLVR envs")
    add_config_arguments(p, "configs/rlhf/smollm2_genrm.yaml",
                         ["run.steps=20", "environments.genrm.options.judge.model=M"], "rlhf")
    p.set_defaults(func=_rlhf)
    g = sub.add_parser("genrm", help="train or evaluate a generative reward model")
    gsub = g.add_subparsers(dest="genrm_command", required=True)
    t = gsub.add_parser("train", help="SFT warm-up (optional) + RL on preference labels")
    add_config_arguments(t, "configs/genrm/smollm2_pref.yaml", ["run.steps=20", "warmup.enabled=true"], "genrm train")
    t.set_defaults(func=_train)
    e = gsub.add_parser("eval", help="pairwise accuracy and score errors on held-out preference pairs")
    e.add_argument("--model", help="the GenRM: hub id, model folder, or built-in name")
    add_config_arguments(e, "a YAML of GenRMEvalConfig keys (model, source, split, limit, generation)",
                         ["limit=50", "scoring=expected", "prompt_style=compact", "judge.backend=openai",
                          "judge.base_url=http://127.0.0.1:8000/v1"], "genrm eval", resume=False)
    e.set_defaults(func=_eval)
