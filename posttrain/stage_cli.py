"""What every config command shares: `[--config F] [key=value ...] [--set key=value] [--dry-run]
[--resume]` and `keys`; and `posttrain config COMMAND`, every key of any command's config.

One override grammar everywhere: positional ``key=value`` (``--set key=value`` is the same, for
those used to it), applied in order after the YAML preset. Each command's help shows examples
that are checked to parse (``tests/test_cli.py`` parses them all).
"""

from __future__ import annotations

import argparse
import importlib
import json
from collections.abc import Callable, Sequence
from typing import Any

from posttrain.config import describe, load_config, to_yaml

# `posttrain config COMMAND`: the config class of each command that has one.
CONFIGS: dict[str, str] = {
    "chat": "posttrain.config:ChatConfig",
    "sft": "posttrain.sft.config:SFTConfig",
    "rlvr": "posttrain.rlvr.config:RLVRConfig",
    "rlhf": "posttrain.genrm.config:RLHFConfig",
    "genrm train": "posttrain.genrm.config:GenRMTrainConfig",
    "genrm eval": "posttrain.genrm.config:GenRMEvalConfig",
    "pipeline": "posttrain.pipeline:PipelineConfig",
    "eval": "posttrain.held_out:EvalConfig",
    "dpo": "posttrain.preference.config:DPOStageConfig",
    "rm train": "posttrain.preference.config:RMStageConfig",
    "rm eval": "posttrain.preference.config:RMEvalConfig",
}


def config_class(command: str) -> type:
    module, _, name = CONFIGS[command].partition(":")
    return getattr(importlib.import_module(module), name)


def add_config_arguments(p: argparse.ArgumentParser, preset: str, examples: Sequence[str], command: str, *,
                         resume: bool = True, dry_run: bool = True) -> None:
    """The shared arguments of ``command``; ``examples`` are overrides its config accepts (shown in help)."""
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=(
        f"dotted overrides, e.g. {' '.join(examples)}; a list item by index or name "
        f"(environments.0.options.size=50); `keys` lists every key (= posttrain config {command})"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set_overrides",
                   help="an override, as a positional KEY=VALUE (repeatable)")
    p.add_argument("--config", help=f"YAML preset, e.g. {preset}")
    if dry_run:
        p.add_argument("--dry-run", action="store_true", help=(
            "print the resolved config, build its environments and read their data; write nothing, train nothing"))
    if resume:
        p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    p.set_defaults(config_command=command, help_examples=list(examples))


def overrides_of(args: argparse.Namespace, *flags: str) -> list[str]:
    """Positional overrides, then ``--set`` ones, then those the command's own flags stand for."""
    return [*args.overrides, *getattr(args, "set_overrides", []), *flags]


def run_config_command(cls: type, args: argparse.Namespace, call: Callable[[Any], Any],
                       plan: Callable[[Any], list[tuple[str, Any]]] | None = None, flags: Sequence[str] = (),
                       dry_run_extra: Callable[[Any], str] | None = None) -> int:
    """`keys` lists the config's keys; else build it and run ``call(cfg)``, printing its result as JSON
    when there is one. ``--dry-run`` instead prints the resolved config (or ``plan(cfg)``'s titled
    sections), builds every environment it names and reads their data, writing nothing.
    ``flags``: overrides the command's own options stand for (``--model M`` -> ``model.name=M``);
    ``dry_run_extra(cfg)``: text printed after the dry run's config (SFT's per-rank memory plan)."""
    if args.overrides[:1] == ["keys"]:
        print("\n".join(describe(cls)))
        return 0
    cfg = load_config(cls, args.config, overrides_of(args, *flags))
    if args.dry_run:
        for title, section in (plan(cfg) if plan else [("", cfg)]):
            print(f"# {title}\n" if title else "", to_yaml(section), sep="", end="")
            if getattr(section, "environments", None):
                from posttrain.environments.registry import environment_lines, opened

                with opened(section.environments) as envs:  # built once: loading one may read a dataset
                    print("\n".join(f"# {line}" for line in environment_lines(envs)))
                    if hasattr(section, "rollout") and hasattr(section, "train"):  # an RL stage
                        _print_rl_plan(section, envs)
        if dry_run_extra is not None:
            print(dry_run_extra(cfg))
        return 0
    result = call(cfg)
    if result is not None:
        print(json.dumps(result, indent=1, sort_keys=True, default=str))
    return 0


def _print_rl_plan(section: Any, envs: dict[str, Any]) -> None:
    """An RL stage's dry run: its placement group and its trainer's memory plan."""
    from posttrain.models import cache_root
    from posttrain.rlvr.actors import placement_lines
    from posttrain.training.memory_plan import stage_plan

    print("\n".join(f"# {line}" for line in placement_lines(section, envs)))
    plan_text = stage_plan(section.model, section.train, section.lora, section.train.workers, cache_root=cache_root())
    plan_text = plan_text.replace("memory plan, per rank:", "trainer memory plan, per worker:", 1)
    print("\n".join(f"# {line}" for line in plan_text.splitlines()))


def _config(args: argparse.Namespace) -> int:
    from posttrain.errors import ConfigError

    command = " ".join(args.command_name)
    if command not in CONFIGS:
        raise ConfigError(f"no config for {command!r}; commands with one: {', '.join(CONFIGS)}")
    print("\n".join(describe(config_class(command))))
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("config", help="every key of a command's config, with type, default and help")
    p.add_argument("command_name", nargs="+", metavar="COMMAND", help=f"one of: {', '.join(CONFIGS)}")
    p.set_defaults(func=_config)
