"""Preference data -> TRL's conversational preference rows.

Two shapes are read, from the shipped set, a local JSONL/Parquet/CSV file or folder, or a hub id:

* HelpSteer3 (``context``, ``response1``, ``response2``, ``overall_preference``; the GenRM's data,
  :mod:`posttrain.genrm.preference_data`): the preferred response is ``chosen``; ties are dropped;
* ``prompt`` / ``chosen`` / ``rejected`` (TRL's and most hub preference sets): the prompt a string or
  chat messages, each response a string or a list holding the assistant message.

Each row becomes ``{"prompt": messages, "chosen": [assistant], "rejected": [assistant],
"chat_template_kwargs": {"enable_thinking": ...}, "margin": m}``: TRL renders it with the model's
tokenizer, which is our reasoning-aware chat template (thinking off by default: preference
responses are answers). ``margin`` is how strongly the label prefers (1-3 on HelpSteer3's scale, 1
when the data does not say), for Bradley-Terry reward models; ``category`` the pair's domain ("" when
the data has none), for per-category accuracy.
"""

from __future__ import annotations

from typing import Any

from posttrain.dataset_io import messages_of
from posttrain.environments.data import DataError, OnInvalid, validate_rows
from posttrain.genrm.preference_data import SHIPPED, pairs_of_rows, preferred_side, read_rows

Messages = list[dict[str, str]]


def preference_split(data: Any, split: str) -> list[dict[str, Any]]:
    """The ``train`` or ``test`` (held-out) rows of a stage's ``data`` section (:class:`PreferenceDataConfig`)."""
    test = split == "test"
    return preference_rows(data.test_path or data.path if test else data.path, split,
                           limit=data.test_limit if test else data.limit, subset=data.subset, system=data.system,
                           enable_thinking=data.enable_thinking, on_invalid=data.on_invalid)


def preference_rows(source: str = SHIPPED, split: str = "train", *, limit: int | None = None,
                    subset: str | None = None, system: str | None = None,
                    enable_thinking: bool = False, on_invalid: OnInvalid = "skip") -> list[dict[str, Any]]:
    """The pairs of ``split`` of ``source`` as TRL rows; bad rows are reported by row and field, then
    dropped (``on_invalid="error"``: the dataset is refused)."""
    raw = read_rows(source, split, limit, subset)
    if raw and isinstance(raw[0], dict) and {"chosen", "rejected"} <= set(raw[0]):
        rows = validate_rows(raw, lambda i, row: _plain_row(row), source=source, on_invalid=on_invalid)
    else:
        rows = []
        for pair in pairs_of_rows(raw, source, on_invalid=on_invalid):
            better = preferred_side(pair.ranking)
            chosen, rejected = (pair.response_1, pair.response_2) if better == 1 else (pair.response_2, pair.response_1)
            rows.append({"prompt": list(pair.context), "chosen": [_assistant(chosen)],
                         "rejected": [_assistant(rejected)], "margin": abs(pair.ranking - 3.5) + 0.5,
                         "category": pair.category})
    if not rows:
        raise DataError(f"no usable preference pair in {source!r} (split {split!r})")
    template = {"enable_thinking": enable_thinking}
    out = []
    for row in rows:
        prompt = row["prompt"] if not system or row["prompt"][0]["role"] == "system" else \
            [{"role": "system", "content": system}, *row["prompt"]]
        out.append({**row, "prompt": prompt, "chat_template_kwargs": template})
    return out


def _assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def _plain_row(row: Any) -> dict[str, Any]:
    if not isinstance(row, dict) or "prompt" not in row:
        raise DataError("no 'prompt' field (rows need prompt, chosen, rejected)")
    prompt = messages_of(row["prompt"], "prompt", last_role="user")
    chosen, rejected = (_response(row.get(k), k) for k in ("chosen", "rejected"))
    margin = 1.0 if row.get("margin") is None else row["margin"]  # a column other rows lack reads None
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or margin <= 0:
        raise DataError(f"field 'margin' must be a positive number (got {margin!r})")
    return {"prompt": prompt, "chosen": [_assistant(chosen)], "rejected": [_assistant(rejected)],
            "margin": float(margin), "category": str(row.get("category") or "")}


def _response(value: Any, field: str) -> str:
    if isinstance(value, list):
        value = messages_of(value, field, last_role="assistant")[-1]["content"]
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"field {field!r} must be a non-empty string or a list ending with the assistant message")
    return value
