"""`posttrain env list | show NAME | check NAME`."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from posttrain.config import parse_overrides
from posttrain.errors import ConfigError


@contextmanager
def _opened(args: argparse.Namespace) -> Iterator[Any]:
    """The environment the command names, closed when the command is done."""
    from posttrain.environments.registry import EnvConfig, opened

    options = parse_overrides(args.option) if args.option else {}
    if args.options_json:
        try:
            extra = json.loads(args.options_json)
        except ValueError as exc:
            raise ConfigError(f"--options-json is not JSON ({exc}); give one object, e.g. '{{\"size\": 50}}'") from None
        if not isinstance(extra, dict):
            raise ConfigError(f"--options-json must be a JSON object of options (got {type(extra).__name__})")
        options.update(extra)
    with opened([EnvConfig(name=args.name, options=options)]) as envs:
        yield envs[args.name]


def _list(args: argparse.Namespace) -> int:
    from posttrain.environments import registry

    for name in registry.builtin_names():
        print(f"{name:24s} built-in")
    for name in registry.entry_point_names():
        print(f"{name:24s} entry point ({registry.ENTRY_POINT_GROUP})")
    print("(or any module:Class implementing posttrain.environments.base.Environment)")
    return 0


def _show(args: argparse.Namespace) -> int:
    from posttrain.environments.multiturn import is_multiturn
    from posttrain.environments.options import describe_options
    from posttrain.environments.registry import find_class
    from posttrain.errors import EnvironmentLoadError

    options = "\n".join(f"  {line}" for line in describe_options(find_class(args.name)))
    try:
        with _opened(args) as env:
            samples = list(env.samples(args.split, args.seed))
            multiturn = is_multiturn(env)
            golds = [env.gold_episode(s) if multiturn else None for s in samples[: args.n]]
    except EnvironmentLoadError:  # bad or missing options: the list of them is what the user needs
        print(f"options of {args.name} (environments[i].options; name: type = default  # help):\n{options}")
        raise
    kind = f", multi-turn (at most {env.max_turns} turns)" if multiturn else ""
    print(f"{env.name}: {len(samples)} {args.split} samples (seed {args.seed}){kind}")
    print(f"options (environments[i].options; name: type = default  # help):\n{options}")
    for tool in (env.tools if multiturn else ()):
        print(f"[tool] {json.dumps(tool)}")
    for s, gold in zip(samples[: args.n], golds):
        print(f"--- {s.id}  info={json.dumps(s.info, default=str)[:200]}")
        for m in s.messages:
            print(f"[{m['role']}] {m['content']}")
        if gold is not None:
            for i, turn in enumerate(gold):
                print(f"[gold turn {i + 1}] {turn[:500]}")
        else:
            print(f"[gold] {str(s.answer)[:500]}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from posttrain.environments.check import check_environment, reward_histogram, sample_with_model

    from posttrain.environments.multiturn import is_multiturn

    with _opened(args) as env:
        report = check_environment(env, n=args.n, seed=args.seed)
        print("\n".join(report.lines()))
        if args.model and is_multiturn(env):
            print("--model samples single-turn environments only; multi-turn episodes run in `posttrain rlvr`")
        elif args.model:
            _, scores = sample_with_model(env, args.model, args.n, seed=args.seed)
            print(f"reward distribution of {len(scores)} completions sampled from {args.model}:")
            print("\n".join(reward_histogram(scores)))
    return 0 if report.ok else 1


def add_commands(sub: Any) -> None:
    p_env = sub.add_parser("env", help="list, show and check verifiable environments")
    env_sub = p_env.add_subparsers(dest="env_command", required=True, metavar="ACTION")
    env_sub.add_parser("list", help="built-in and installed environments").set_defaults(func=_list)
    for action, func, help_text in (("show", _show, "print its options and a few samples with their gold answers"),
                                    ("check", _check, "gold scores 1.0, garbage/adversarial scores 0")):
        p = env_sub.add_parser(action, help=help_text)
        p.add_argument("name", help="built-in name, entry point name, or module:Class")
        p.add_argument("--option", "-o", action="append", default=[], metavar="KEY=VALUE",
                       help="environment option, e.g. -o size=50 -o levels=[1,2] (repeatable)")
        p.add_argument("--options-json", help="environment options as one JSON object")
        p.add_argument("--n", type=int, default=5 if action == "show" else 10, help="samples to use")
        p.add_argument("--seed", type=int, default=0)
        if action == "show":
            p.add_argument("--split", default="train", choices=("train", "test"))
        else:
            p.add_argument("--model", help="also sample completions from this model and show their rewards")
        p.set_defaults(func=func)
