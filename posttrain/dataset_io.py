"""Reading dataset rows from where users keep them: a local file or folder, or a hub id.

One loader for every stage (SFT message sets, environment prompt sets), through ``datasets``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from posttrain.errors import DataError, NotFoundError

FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def load_rows(source: str, split: str = "train", limit: int | None = None,
              subset: str | None = None) -> list[dict[str, Any]]:
    """Rows of a local JSONL/JSON/Parquet/CSV file, a local dataset folder, or a hub dataset id."""
    import datasets

    path = Path(source).expanduser()
    if source.startswith((".", "/", "~")) and not path.exists():
        raise NotFoundError(f"dataset path {source!r} not found")
    try:
        if path.is_file():
            fmt = FORMATS.get(path.suffix.lower())
            if fmt is None:
                raise DataError(f"{path}: unsupported file type {path.suffix!r}; use {', '.join(FORMATS)}")
            ds = datasets.load_dataset(fmt, data_files=str(path), split="train")
        else:  # a local dataset folder or a hub id
            ds = datasets.load_dataset(str(path) if path.is_dir() else source, subset, split=split)
    except DataError:
        raise
    except Exception as exc:  # datasets raises many kinds; name the source
        raise DataError(f"cannot load dataset {source!r} (split {split!r}): {exc}") from exc
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    return [dict(row) for row in ds]


def messages_of(value: Any, field: str, last_role: str | None = None) -> list[dict[str, str]]:
    """A dataset cell as chat messages: a non-empty string is one user turn; a list of ``{role, content}``
    messages is kept (ending with ``last_role`` when given); anything else is a DataError naming ``field``."""
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value}]
    if isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value):
        if last_role is not None and value[-1]["role"] != last_role:
            raise DataError(f"field {field!r} must end with a {last_role} message (got {value[-1]['role']!r})")
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise DataError(f"field {field!r} must be a non-empty string or a non-empty list of {{role, content}} messages "
                    f"(got {type(value).__name__})")
