"""An environment's options as a typed schema, checked before the environment is built.

An environment declares its options either as a pydantic model in the class attribute
``Options`` (the ``genrm`` environment does), or -- the plain way -- as typed keyword
parameters of ``__init__``, documented in an ``Options:`` section of the class docstring::

    class MyEnv(DefaultHooks):
        \"\"\"Counting puzzles.

        Options:
            size: train prompts
            levels: difficulty levels to draw from (1-5)
        \"\"\"

        def __init__(self, size: int = 500, levels: list[int] = [1, 2]) -> None: ...

:func:`check_options` validates a run's ``options`` mapping against that schema (types,
required options, unknown names with "did you mean"), so ``size: many`` or ``levls`` is one
readable error naming the environment and the option, at config time (``--dry-run`` too);
:func:`describe_options` is what ``posttrain env show`` prints. An ``__init__`` with
``**kwargs`` accepts unknown names (they are the environment's own business).
"""

from __future__ import annotations

import inspect
import re
import typing
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from posttrain.config import describe, error_lines
from posttrain.errors import EnvironmentLoadError

_HEADER = re.compile(r"^(\s*)Options:\s*$")
_ENTRY = re.compile(r"^(\s*)([A-Za-z_][A-Za-z0-9_]*)\s*:\s*(.*)$")


def option_help(cls: Any) -> dict[str, str]:
    """``name -> help`` from the ``Options:`` section of ``cls``'s docstring (Google style)."""
    doc = inspect.getdoc(cls) or ""
    lines = doc.splitlines()
    out: dict[str, str] = {}
    for k, line in enumerate(lines):
        header = _HEADER.match(line)
        if not header:
            continue
        base, entry_indent, name = len(header.group(1)), None, None
        for line in lines[k + 1:]:
            if not line.strip():
                continue
            indent = len(line) - len(line.lstrip())
            if indent <= base:
                break
            entry = _ENTRY.match(line)
            if entry and (entry_indent is None or indent == entry_indent):
                entry_indent, name = indent, entry.group(2)
                out[name] = entry.group(3).strip()
            elif name is not None:
                out[name] = f"{out[name]} {line.strip()}".strip()
        break
    return out


def _init_of(cls: Any) -> Callable[..., Any]:
    return cls.__init__ if isinstance(cls, type) else cls


def _hints(func: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(func)
    except Exception:  # noqa: BLE001 - an unresolvable annotation: check what resolves one by one
        hints = {}
        for name, value in getattr(func, "__annotations__", {}).items():
            try:
                hints[name] = typing.get_type_hints(type("_", (), {"__annotations__": {name: value},
                                                                   "__module__": func.__module__}))[name]
            except Exception:  # noqa: BLE001 - unknown type: accept anything
                hints[name] = Any
        return hints


def options_model(cls: Any) -> type[BaseModel]:
    """The pydantic model of ``cls``'s options: its ``Options`` attribute, else built from ``__init__``."""
    declared = getattr(cls, "Options", None)
    if isinstance(declared, type) and issubclass(declared, BaseModel):
        return declared
    func = _init_of(cls)
    try:
        signature = inspect.signature(func)
    except (TypeError, ValueError):  # a builtin or C callable: nothing to read
        return create_model(f"{getattr(cls, '__name__', 'env')}Options", __config__=ConfigDict(extra="allow"))
    hints, fields, extra = _hints(func), {}, "forbid"
    for k, (name, param) in enumerate(signature.parameters.items()):
        if k == 0 and isinstance(cls, type) and name in ("self", "cls"):
            continue
        if param.kind is param.VAR_KEYWORD:
            extra = "allow"
        elif param.kind is not param.VAR_POSITIONAL:
            default = ... if param.default is param.empty else param.default
            fields[name] = (hints.get(name, Any), default)
    config = ConfigDict(extra=extra, arbitrary_types_allowed=True, protected_namespaces=())
    model_name = f"{getattr(cls, '__name__', 'env')}Options"
    try:
        return create_model(model_name, __config__=config, **fields)
    except Exception:  # noqa: BLE001 - a type pydantic cannot check: keep the names, defaults and required ones
        return create_model(model_name, __config__=config, **{k: (Any, d) for k, (_, d) in fields.items()})


def check_options(name: str, cls: Any, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` validated against ``cls``'s schema: the given keys with their values coerced to the
    declared types (``"50"`` -> 50, a list for a tuple); an :class:`EnvironmentLoadError` naming the
    environment and every bad option otherwise."""
    if not isinstance(options, dict):
        raise EnvironmentLoadError(f"environment {name!r}: options must be a mapping (got {type(options).__name__})")
    model = options_model(cls)
    try:
        checked = model.model_validate(options)
    except ValidationError as exc:
        lines = [f"environment {name!r}: bad options (`posttrain env show {name}` lists them):"]
        raise EnvironmentLoadError("\n".join(lines + error_lines(model, exc, noun="option"))) from None
    if model is getattr(cls, "Options", None):
        return dict(options)  # the environment validates its own model again; hand it what was written
    values = dict(checked)
    return {key: values.get(key, options[key]) for key in options}


def describe_options(cls: Any) -> list[str]:
    """One line per option: ``name: type = default  # help`` (required options have no default)."""
    model = options_model(cls)
    lines = describe(model, helps=option_help(cls))
    if model.model_config.get("extra") == "allow":
        lines.append("(other options are passed on unchecked)")
    return lines
