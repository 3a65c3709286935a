"""Finding environments: built-in names, ``module:Class`` paths, and entry points.

A separate pip package ships an environment by declaring, in its pyproject.toml::

    [project.entry-points."posttrain.environments"]
    my_env = "my_package.env:MyEnv"

Every environment is built the same way: ``cls(**options)``, where ``options`` is the
``environments[i].options`` mapping of the run config, first checked against the options the
environment declares (:mod:`posttrain.environments.options`: unknown names and wrong types are one
error naming each option); the environment's own ``TypeError``/``ValueError`` is reported with its name. An
environment that leaves out optional hooks of the protocol gets their defaults here, so the
stages call every hook directly. A multi-turn environment (``reset``/``step`` instead of ``score``,
see :mod:`posttrain.environments.multiturn`) is accepted too, and also gets ``tools``,
``max_turns`` and ``gold_episode`` when it leaves them out. :func:`opened` is how a stage holds environments: it closes
them on the way out, also on error.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
import os
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from pydantic import Field

from posttrain.config import Config
from posttrain.environments.base import HOOKS, DefaultHooks, Environment
from posttrain.environments.multiturn import is_multiturn
from posttrain.environments.options import check_options
from posttrain.errors import DataError, EnvironmentLoadError, NotFoundError

ENTRY_POINT_GROUP = "posttrain.environments"
log = logging.getLogger(__name__)

_BUILTINS: dict[str, str] = {
    "math": "posttrain.environments.math_env:MathEnv",
    "code": "posttrain.environments.code_env:CodeEnv",
    "instruction_following": "posttrain.environments.instruction_env:InstructionEnv",
    "json_schema": "posttrain.environments.json_env:JsonSchemaEnv",
    "reasoning_gym": "posttrain.environments.reasoning_gym_env:ReasoningGymEnv",
    "genrm_preference": "posttrain.genrm.preference_env:PreferenceEnv",
    "genrm": "posttrain.genrm.environment:GenRMEnv",
    "reward_model": "posttrain.preference.reward_model_env:RewardModelEnv",
    "python_tool": "posttrain.environments.python_tool_env:PythonToolEnv",
    "guess_number": "posttrain.environments.guess_number_env:GuessNumberEnv",
    "http": "posttrain.environments.http_env:HttpEnv",
    "reward_function": "posttrain.environments.reward_fn_env:RewardFunctionEnv",
}
# What a multi-turn environment (reset/step, no score) may leave out, and the default it gets.
MULTITURN_DEFAULTS: dict[str, Any] = {"tools": (), "max_turns": 8}


ENVIRONMENTS_HELP = ("environments, each {name, weight, options}; an item's options by index or name "
                     "(environments.math.options.size=500); `posttrain env show NAME` lists an environment's options")


class EnvConfig(Config):
    name: str = Field(description="built-in name, entry-point name, or module:Class")
    weight: float = Field(1.0, gt=0, description="share of each step's prompts (normalised over envs)")
    options: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the environment")


def builtin_names() -> list[str]:
    return sorted(_BUILTINS)


def entry_point_names() -> list[str]:
    return sorted(ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def find_class(name: str) -> Callable[..., Environment]:
    """Resolve ``name`` (built-in, entry point, or ``module:Class``) to a class or factory."""
    target = _BUILTINS.get(name)
    if target is None:
        eps = [ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == name]
        if eps:
            try:
                return eps[0].load()
            except Exception as exc:
                raise EnvironmentLoadError(f"entry point {name!r} ({eps[0].value}) failed to load: {exc}") from exc
        if ":" not in name:
            known = ", ".join(builtin_names() + entry_point_names())
            raise EnvironmentLoadError(f"unknown environment {name!r}; known: {known}; or give module:Class")
        target = name
    module_name, _, attr = target.partition(":")
    try:
        module = import_user_module(module_name)
    except ImportError as exc:
        raise EnvironmentLoadError(f"environment {name!r}: cannot import {module_name!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError:
        raise EnvironmentLoadError(f"environment {name!r}: {module_name!r} has no attribute {attr!r}") from None


def import_user_module(module_name: str) -> types.ModuleType:
    """``module_name`` imported; not found on the path, then from the current folder, as ``python -m``
    finds it (also for the Ray workers started later: the folder goes on ``PYTHONPATH`` too)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        cwd = os.getcwd()
        if exc.name != module_name.split(".")[0] or cwd in sys.path or "" in sys.path:
            raise
        sys.path.insert(0, cwd)
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (cwd, os.environ.get("PYTHONPATH")) if p)
        log.info("environment module %r: imported from the current folder %s", module_name, cwd)
        return importlib.import_module(module_name)


def load_environment(cfg: EnvConfig | str, **options: Any) -> Environment:
    if isinstance(cfg, str):
        cfg = EnvConfig(name=cfg, options=options)
    cls = find_class(cfg.name)
    options = check_options(cfg.name, cls, cfg.options)
    try:
        env = cls(**options)
    except (DataError, NotFoundError) as exc:  # the options are fine; what they point at is not
        raise type(exc)(f"environment {cfg.name!r}: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise EnvironmentLoadError(f"environment {cfg.name!r}: bad options {cfg.options}: {exc}") from exc
    if is_multiturn(env):
        required, protocol = ("name", "samples", "reset", "step"), "posttrain.environments.multiturn"
    else:
        required, protocol = ("name", "samples", "score"), "posttrain.environments.base"
    missing = [a for a in required if not hasattr(env, a)]
    if missing:
        raise EnvironmentLoadError(f"environment {cfg.name!r} lacks {', '.join(missing)} (see {protocol})")
    env = with_default_hooks(env, cfg.name)
    return with_multiturn_defaults(env, cfg.name) if is_multiturn(env) else env


def with_default_hooks(env: Any, name: str = "") -> Environment:
    """``env`` with every hook of the protocol: those it does not define get :class:`DefaultHooks`' defaults."""
    for hook in HOOKS:
        if hasattr(env, hook):
            continue
        default = getattr(DefaultHooks, hook)
        try:
            setattr(env, hook, types.MethodType(default, env) if callable(default) else default)
        except AttributeError:  # __slots__ and the like
            raise EnvironmentLoadError(f"environment {name!r} lacks {hook} and cannot take the default: define it, "
                                       "or inherit posttrain.environments.base.DefaultHooks") from None
    return env


def _no_gold_episode(self: Any, sample: Any) -> None:
    """No scripted episode: ``env check`` runs only the garbage episodes."""
    return None


def with_multiturn_defaults(env: Any, name: str = "") -> Any:
    """A multi-turn ``env`` with ``tools``, ``max_turns`` and ``gold_episode`` (MULTITURN_DEFAULTS, no script)."""
    defaults = dict(MULTITURN_DEFAULTS, gold_episode=_no_gold_episode)
    for attr, default in defaults.items():
        if hasattr(env, attr):
            continue
        try:
            setattr(env, attr, types.MethodType(default, env) if callable(default) else default)
        except AttributeError:
            raise EnvironmentLoadError(f"environment {name!r} lacks {attr} and cannot take the default: define "
                                       "it (see posttrain.environments.multiturn)") from None
    max_turns = env.max_turns
    if not isinstance(max_turns, int) or isinstance(max_turns, bool) or max_turns < 1:
        raise EnvironmentLoadError(f"environment {name!r}: max_turns must be an integer >= 1 (got {max_turns!r})")
    return env


@contextmanager
def opened(cfgs: Sequence[EnvConfig | str]) -> Iterator[dict[str, Environment]]:
    """The environments of ``cfgs`` by config name, closed on the way out -- also on error, and also
    those loaded before a later one failed to load -- so no checker process outlives its stage."""
    envs: dict[str, Environment] = {}
    try:
        for cfg in cfgs:
            cfg = EnvConfig(name=cfg) if isinstance(cfg, str) else cfg
            envs[cfg.name] = load_environment(cfg)
        yield envs
    finally:
        for name, env in envs.items():
            try:
                env.close()
            except Exception:  # noqa: BLE001 - close the others; the stage's own error matters more
                log.exception("closing environment %r failed", name)


def check_environments(cfgs: Sequence[EnvConfig]) -> list[str]:
    """Build every environment of ``cfgs`` and read both splits of its data, as a run would before
    its first step; one line per environment (``--dry-run``). Bad options or data raise here."""
    with opened(cfgs) as envs:
        return environment_lines(envs)


def environment_lines(envs: dict[str, Environment]) -> list[str]:
    """:func:`check_environments` for environments already open."""
    lines = []
    for name, env in envs.items():
        counts = {split: len(env.samples(split, 0)) for split in ("train", "test")}
        if not counts["train"]:
            raise EnvironmentLoadError(f"environment {name!r} has no train samples")
        lines.append(f"environment {name}: ok, {counts['train']} train / {counts['test']} test samples")
    return lines
