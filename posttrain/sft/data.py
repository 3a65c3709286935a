"""SFT data: load message datasets, check every row, apply the reasoning-budget transforms,
tokenize with an assistant-only loss mask.

Reasoning-budget transforms follow the Nemotron 3 Nano recipe. For the final assistant turn of
a sample that carries reasoning, one of (drawn per row from ``data.seed`` and the row index, so
the choice does not depend on data order or on the number of processes):

- ``off``  (default 10%): reasoning removed; rendered with thinking off (``<think></think>``),
- ``cut``  (default 3%): reasoning cut to ``budget`` tokens, the original final answer kept,
  and ``{thinking token budget: budget}`` announced in the last user message (the template's tag),
- ``full``: unchanged. Samples without reasoning are ``plain``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from posttrain import chat_template
from posttrain.errors import DataError, NotFoundError
from posttrain.sft.config import DataConfig

ROLES = ("system", "user", "assistant", "tool")
MAX_REPORTED_ERRORS = 10


@dataclass(frozen=True)
class Example:
    """One conversation ready to render: messages and the chat-template flags for it."""

    row: int
    messages: list[dict[str, Any]]
    mode: str  # full | off | cut | plain
    template: dict[str, Any] = field(default_factory=dict)  # enable_thinking, reasoning_budget


@dataclass(frozen=True)
class Tokenized:
    row: int
    mode: str
    input_ids: list[int]
    loss_mask: list[int]  # 1 on assistant tokens (content, reasoning, closing <|im_end|>)

    @property
    def n_loss_tokens(self) -> int:
        return sum(self.loss_mask)


# --------------------------------------------------------------------------- loading


def shipped_dataset(name: str) -> Path:
    """Folder of a dataset shipped in ``posttrain/data`` (``posttrain:NAME``)."""
    folder = Path(str(resources.files("posttrain").joinpath("data", name)))
    if not folder.is_dir():
        available = sorted(p.name for p in Path(str(resources.files("posttrain").joinpath("data"))).iterdir()
                           if p.is_dir() and not p.name.startswith(("_", ".")))
        raise NotFoundError(f"no shipped dataset {name!r}; available: {', '.join(available)}")
    return folder


def load_rows(cfg: DataConfig) -> list[dict[str, Any]]:
    """Rows of ``cfg.path`` (file, folder, ``posttrain:NAME`` or hub id), messages column only."""
    from posttrain.dataset_io import load_rows as read

    path = cfg.path
    if path.startswith("posttrain:"):
        path = str(shipped_dataset(path.partition(":")[2]))
    rows = read(path, split=cfg.split, limit=cfg.limit)
    if rows and cfg.messages_field not in rows[0]:
        raise DataError(f"data.path {path!r} has no column {cfg.messages_field!r} (columns: "
                        f"{', '.join(rows[0])}); set data.messages_field")
    return [{cfg.messages_field: r[cfg.messages_field], **({"tools": row_tools(r["tools"])} if r.get("tools") else {})}
            for r in rows]


def row_tools(tools: Any) -> list[dict[str, Any]]:
    """A row's ``tools`` column: OpenAI function schemas, as a list or as its JSON text (hub datasets)."""
    return json.loads(tools) if isinstance(tools, str) else list(tools)


def row_errors(index: int, messages: Any, fld: str = "messages") -> list[str]:
    """Problems of one row, each naming the row, the field and what was found."""
    where = f"row {index}, field {fld}"
    if not isinstance(messages, list) or not messages:
        return [f"{where}: expected a non-empty list of messages, got {type(messages).__name__}"]
    errors = []
    for j, m in enumerate(messages):
        at = f"{where}[{j}]"
        if not isinstance(m, dict):
            errors.append(f"{at}: expected a dict with role and content, got {type(m).__name__}")
            continue
        if m.get("role") not in ROLES:
            errors.append(f"{at}.role = {m.get('role')!r}: must be one of {', '.join(ROLES)}")
        for key in ("content", "reasoning_content"):
            if m.get(key) is not None and not isinstance(m[key], str):
                errors.append(f"{at}.{key}: expected a string, got {type(m[key]).__name__}")
        if m.get("content") is None and not m.get("reasoning_content") and not m.get("tool_calls"):
            errors.append(f"{at}: has no content")
    if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in messages):
        errors.append(f"{where}: no assistant message, so nothing to learn from")
    return errors


def check_rows(rows: Sequence[dict[str, Any]], fld: str = "messages") -> None:
    """Raise one ``DataError`` listing the first bad rows, before any model is loaded."""
    errors: list[str] = []
    for i, row in enumerate(rows):
        errors.extend(row_errors(i, row.get(fld), fld))
        if len(errors) >= MAX_REPORTED_ERRORS:
            break
    if errors:
        raise DataError("bad dataset rows (fix or drop them; a message is "
                        "{'role': 'user'|'assistant'|..., 'content': str, 'reasoning_content'?: str}):\n  "
                        + "\n  ".join(errors[:MAX_REPORTED_ERRORS]))


# --------------------------------------------------------------------------- transforms


def split_assistant(message: dict[str, Any]) -> tuple[str, str]:
    """(reasoning, answer) of an assistant message: ``reasoning_content`` or inline ``<think>``."""
    content = message.get("content") or ""
    reasoning = message.get("reasoning_content") or ""
    if chat_template.THINK_CLOSE in content:
        parsed = chat_template.split_reasoning(content, started_in_reasoning=False)
        reasoning, content = parsed.reasoning or "", parsed.answer
    return reasoning.strip(), content.strip()


def make_example(index: int, messages: list[dict[str, Any]], cfg: DataConfig, tokenizer: Any,
                 tools: list[dict[str, Any]] | None = None) -> Example:
    """Apply the reasoning-budget transform drawn for row ``index`` (see module docstring).
    ``tools`` (the row's function schemas) are rendered into the system turn."""
    last = max(i for i, m in enumerate(messages) if m.get("role") == "assistant")
    reasoning, answer = split_assistant(messages[last])
    msgs = [dict(m) for m in messages]
    calls = {"tool_calls": messages[last]["tool_calls"]} if messages[last].get("tool_calls") else {}
    base = {"tools": tools} if tools else {}
    if not reasoning:
        msgs[last] = {"role": "assistant", "content": answer, **calls}
        return Example(index, msgs, "plain", base)
    rng = random.Random(f"{cfg.seed}:{index}")
    draw = rng.random()
    if draw < cfg.reasoning_off_share:
        msgs[last] = {"role": "assistant", "content": answer, **calls}
        return Example(index, msgs, "off", {**base, "enable_thinking": False})
    if draw < cfg.reasoning_off_share + cfg.budget_cut_share:
        ids = tokenizer.encode(reasoning, add_special_tokens=False)
        if len(ids) >= 2:
            budget = max(1, min(len(ids) - 1, round(len(ids) * rng.uniform(*cfg.budget_fraction))))
            cut = tokenizer.decode(ids[:budget]).strip()
            msgs[last] = {"role": "assistant", "reasoning_content": cut, "content": answer, **calls}
            return Example(index, msgs, "cut", {**base, "reasoning_budget": budget})
    msgs[last] = {"role": "assistant", "reasoning_content": reasoning, "content": answer, **calls}
    return Example(index, msgs, "full", base)


def tokenize(example: Example, tokenizer: Any) -> Tokenized:
    ids, mask = chat_template.encode_with_assistant_mask(tokenizer, example.messages, **example.template)
    return Tokenized(example.row, example.mode, ids, mask)


@dataclass
class Dataset:
    samples: list[Tokenized]
    dropped_overlong: int
    modes: dict[str, int]


def build(cfg: DataConfig, tokenizer: Any, max_tokens: int) -> Dataset:
    """Load, check, transform and tokenize; samples over ``max_tokens`` are dropped or an error."""
    rows = load_rows(cfg)
    check_rows(rows, cfg.messages_field)
    samples, dropped, modes = [], 0, {}
    for i, row in enumerate(rows):
        sample = tokenize(make_example(i, row[cfg.messages_field], cfg, tokenizer, row.get("tools")), tokenizer)
        if len(sample.input_ids) > max_tokens:
            if cfg.overlong == "error":
                raise DataError(f"row {i}: {len(sample.input_ids)} tokens > train.micro_batch_tokens="
                                f"{max_tokens}; raise it or set data.overlong=drop")
            dropped += 1
            continue
        if sample.n_loss_tokens == 0:
            raise DataError(f"row {i}: no assistant tokens after rendering; check its messages")
        samples.append(sample)
        modes[sample.mode] = modes.get(sample.mode, 0) + 1
    if not samples:
        raise DataError(f"data.path {cfg.path!r}: no usable samples ({dropped} longer than {max_tokens} tokens)")
    return Dataset(samples, dropped, modes)


def preview(sample: Tokenized, tokenizer: Any, open_mark: str = "\x1b[42m", close_mark: str = "\x1b[0m") -> str:
    """The rendered sample with loss-carrying spans wrapped in ``open_mark``/``close_mark``."""
    out, span, inside = [], [], False
    for tok, m in zip(sample.input_ids, sample.loss_mask):
        if bool(m) != inside:
            out.append(tokenizer.decode(span))
            out.append(open_mark if m else close_mark)
            span, inside = [], bool(m)
        span.append(tok)
    out.append(tokenizer.decode(span))
    if inside:
        out.append(close_mark)
    return "".join(out)
