"""`posttrain dpo …`, `posttrain rm train …`, `posttrain rm eval …`."""

from __future__ import annotations

import argparse
from typing import Any

from posttrain.stage_cli import add_config_arguments, run_config_command


def _dpo(args: argparse.Namespace) -> int:
    from posttrain.preference.config import DPOStageConfig

    def call(cfg: DPOStageConfig) -> str:
        from posttrain.preference.dpo import train

        return str(train(cfg, resume=args.resume))

    return run_config_command(DPOStageConfig, args, call)


def _rm_train(args: argparse.Namespace) -> int:
    from posttrain.preference.config import RMStageConfig

    def call(cfg: RMStageConfig) -> str:
        from posttrain.preference.rm_train import train

        return str(train(cfg, resume=args.resume))

    return run_config_command(RMStageConfig, args, call)


def _rm_eval(args: argparse.Namespace) -> int:
    from posttrain.preference.config import RMEvalConfig

    def call(cfg: RMEvalConfig) -> dict[str, float]:
        from posttrain.preference.reward_model import evaluate

        return evaluate(cfg)

    return run_config_command(RMEvalConfig, args, call, flags=[f"model.name={args.model}"] if args.model else [])


def add_commands(sub: Any) -> None:
    p = sub.add_parser("dpo", help="DPO on preference pairs (TRL DPOTrainer), in our run folder")
    add_config_arguments(p, "configs/dpo/smollm2_pref.yaml", ["dpo.beta=0.2", "dpo.loss_type=[ipo]", "train.lr=1e-6"],
                         "dpo")
    p.set_defaults(func=_dpo)
    r = sub.add_parser("rm", help="train or evaluate a scalar (Bradley-Terry) reward model")
    rsub = r.add_subparsers(dest="rm_command", required=True)
    t = rsub.add_parser("train", help="Bradley-Terry reward model on preference pairs (TRL RewardTrainer)")
    add_config_arguments(t, "configs/rm/smollm2_pref.yaml", ["train.max_minutes=15", "rm.margin_scale=0", "lora.enabled=true"],
                         "rm train")
    t.set_defaults(func=_rm_train)
    e = rsub.add_parser("eval", help="held-out pairwise accuracy (overall, per category) of a reward model")
    e.add_argument("--model", help="the reward model: a model folder (RUN/model) or hub id")
    add_config_arguments(e, "a YAML of RMEvalConfig keys (model, data, batch_size, max_length)",
                         ["data.test_limit=200", "data.test_path=pairs.jsonl", "batch_size=4"], "rm eval", resume=False)
    e.set_defaults(func=_rm_eval)
