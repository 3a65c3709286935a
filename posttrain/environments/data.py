"""Loading and validating environment datasets before training starts.

``load_rows`` (``posttrain.dataset_io``) takes what users point at: a local JSONL/JSON/Parquet/CSV
file, a local dataset folder, or a hub id. ``validate_rows`` checks every row up front and
reports bad ones by row index and field, so a malformed record never stops a run midway:
by default bad rows are dropped with a warning that lists them; ``on_invalid="error"``
refuses the dataset instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from posttrain.dataset_io import DataError, load_rows

__all__ = ["DataError", "DataSpec", "OnInvalid", "load_rows", "require", "validate_rows"]
log = logging.getLogger(__name__)

OnInvalid = Literal["skip", "error"]


def require(row: Any, fields: dict[str, type | tuple[type, ...]]) -> list[str]:
    """Problems of one row: missing fields, wrong types, empty strings."""
    if not isinstance(row, dict):
        return [f"row is {type(row).__name__}, not a mapping"]
    problems = []
    for name, kind in fields.items():
        if name not in row or row[name] is None:
            problems.append(f"field {name!r} missing")
        elif not isinstance(row[name], kind) or isinstance(row[name], bool) and bool not in _as_tuple(kind):
            problems.append(f"field {name!r} is {type(row[name]).__name__}, expected {_kind_name(kind)}")
        elif isinstance(row[name], str) and not row[name].strip():
            problems.append(f"field {name!r} is empty")
    return problems


def validate_rows(rows: Iterable[Any], convert: Callable[[int, Any], Any], *, source: str,
                  on_invalid: OnInvalid = "skip") -> list[Any]:
    """Apply ``convert(index, row)`` to every row; it raises DataError for a bad row.

    Returns the converted good rows. All problems are collected before deciding, so the
    report lists every bad row, not just the first.
    """
    good, bad = [], []
    for i, row in enumerate(rows):
        try:
            good.append(convert(i, row))
        except DataError as exc:
            bad.append(f"row {i}: {exc}")
    if bad:
        shown = "\n  ".join(bad[:10]) + (f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else "")
        message = f"{source}: {len(bad)} invalid row(s) (numbered from 0, as dataset[i]):\n  {shown}"
        if on_invalid == "error":
            raise DataError(message)
        log.warning("%s\n(dropped; set on_invalid=error to refuse the dataset)", message)
    if not good:
        raise DataError(f"{source}: no valid rows")
    return good


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return " or ".join(k.__name__ for k in _as_tuple(kind))


@dataclass(frozen=True)
class DataSpec:
    """Where an environment's prompts come from: a dataset (``source``) or its own generator."""

    source: str | None = None  # None: the environment generates its prompts offline
    size: int = 300  # generated prompts in the train split
    test_size: int = 60  # generated prompts in the test split
    limit: int | None = None  # first rows of a dataset only
    on_invalid: OnInvalid = "skip"
    test_source: str | None = None  # a separate dataset for the test split

    def check_split(self, split: str) -> None:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test' (got {split!r})")
        if self.size < 1 or self.test_size < 1:
            raise ValueError(f"size and test_size must be >= 1 (got {self.size}, {self.test_size})")

    def generated_count(self, split: str) -> int:
        return self.size if split == "train" else self.test_size

    def rows(self, split: str, convert: Callable[[Any], Any]) -> list[Any]:
        """Load ``split`` of the dataset and convert every row (bad rows reported, see validate_rows)."""
        source = self.test_source if split == "test" and self.test_source else self.source
        if source is None:
            raise ValueError("no dataset source configured")
        return validate_rows(load_rows(source, split=split, limit=self.limit), lambda i, row: convert(row),
                             source=source, on_invalid=self.on_invalid)
