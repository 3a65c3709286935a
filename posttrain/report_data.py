"""Run metrics as the report reads them: stage folders, their ``metrics.jsonl`` rows, before/after evals.

No plotting and no HTML here, so the pipeline (and anything else that reads a run) can use it
without the report's dependencies. Garbled lines and non-finite values are skipped and counted:
a crashed run's metrics are still metrics.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from posttrain.errors import DataError, NotFoundError

PIPELINE_STAGES: tuple[str, ...] = ("sft", "rlvr", "genrm", "rlhf")  # report order
OPTIONAL_STAGES: frozenset[str] = frozenset({"genrm"})  # not listed as missing when absent
STAGE_FILES: tuple[str, ...] = ("metrics.jsonl", "config.yaml", "tensorboard")
Row = dict[str, float]  # "step", optionally "time", and the numeric metrics of one logged line


def run_rows(run_dir: str | Path) -> list[Row]:
    """A stage folder's metric rows (:func:`read_metrics`), none when it has logged nothing yet."""
    path = Path(run_dir) / "metrics.jsonl"
    return read_metrics(path)[0] if path.is_file() else []


def logged_at(run_dir: str | Path, step: int, prefix: str = "eval/") -> bool:
    """Whether a row at ``step`` holds a metric starting with ``prefix`` (a resumed stage skips it)."""
    return any(r.get("step") == step and any(k.startswith(prefix) for k in r) for r in run_rows(run_dir))


def last_step(run_dir: str | Path) -> int:
    """The highest step logged in a stage folder (0 when none)."""
    return max((int(r.get("step", 0)) for r in run_rows(run_dir)), default=0)


@dataclass(frozen=True)
class Stage:
    """One stage folder and its parsed metric rows (file order; a resumed run may repeat steps)."""

    name: str
    folder: Path
    rows: tuple[Row, ...]
    bad_lines: int  # unparsable lines, or lines without an integer "step"
    dropped_values: int  # NaN / inf values left out of rows

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of ``key`` sorted by step; for a repeated step the last line wins."""
        by_step = {int(r["step"]): r[key] for r in self.rows if key in r}
        steps = sorted(by_step)
        return steps, [by_step[s] for s in steps]

    def metric_keys(self) -> list[str]:
        seen: dict[str, None] = {}
        for row in self.rows:
            seen.update(dict.fromkeys(k for k in row if k not in ("step", "time")))
        return list(seen)


def read_metrics(path: Path) -> tuple[list[Row], int, int]:
    """Parse a metrics.jsonl: (rows, bad lines, dropped non-finite values). Never raises on content."""
    rows: list[Row] = []
    bad = dropped = 0
    with open(path, errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except ValueError:
                bad += 1
                continue
            step = obj.get("step") if isinstance(obj, dict) else None
            if not _is_number(step) or not math.isfinite(step) or step != int(step):
                bad += 1
                continue
            row: Row = {}
            for key, value in obj.items():
                if _is_number(value):
                    if math.isfinite(value):
                        row[key] = float(value)
                    else:
                        dropped += 1
            rows.append(row)
    return rows, bad, dropped


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_stage(folder: Path, name: str | None = None) -> Stage:
    """A stage from its folder; the name is ``name``, else the rows' "stage" field, else the folder name."""
    path = folder / "metrics.jsonl"
    rows, bad, dropped = read_metrics(path) if path.is_file() else ([], 0, 0)
    if name is None:
        name = _stage_field(path) or folder.name
    return Stage(name, folder, tuple(rows), bad, dropped)


def _stage_field(path: Path) -> str | None:
    if not path.is_file():
        return None
    with open(path, errors="replace") as fh:
        for line in fh:
            try:
                value = json.loads(line).get("stage")
            except (ValueError, AttributeError):
                continue
            if isinstance(value, str) and value:
                return value
    return None


def find_stages(run_dir: str | Path) -> tuple[list[Stage], list[str]]:
    """(stages found, pipeline stages missing). A folder holding stage files is one stage by itself."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise NotFoundError(f"run folder {str(run_dir)!r} does not exist; pass a pipeline or stage run folder")
    if (run_dir / "metrics.jsonl").exists():
        return [load_stage(run_dir)], []
    known = [run_dir / s for s in PIPELINE_STAGES if (run_dir / s).is_dir()]
    others = sorted(p for p in run_dir.iterdir() if p.is_dir() and p not in known and not p.name.startswith(".")
                    and any((p / f).exists() for f in STAGE_FILES))
    folders = known + others
    if not folders and any((run_dir / f).exists() for f in STAGE_FILES):
        return [load_stage(run_dir)], []  # a stage folder before its first logged step
    if not folders:
        raise DataError(f"no stage found in {str(run_dir)!r}: expected metrics.jsonl there, or stage "
                        f"subfolders ({', '.join(PIPELINE_STAGES)}) holding one")
    missing = [s for s in PIPELINE_STAGES if s not in OPTIONAL_STAGES and not (run_dir / s).is_dir()]
    return [load_stage(p, name=p.name) for p in folders], missing


def eval_keys(stage: Stage) -> list[str]:
    """Held-out eval scores (``eval/...``), without the prompt counts."""
    return sorted(k for k in stage.metric_keys() if k.startswith("eval/") and not k.endswith("/prompts"))


def before_after(stage: Stage, key: str) -> dict[str, float | int | None]:
    """First logged value (before training, at step 0) and last (after). Logged once, it is "before" at
    step 0 and "after" later (a figure the starting model had none of, e.g. accuracy over readable verdicts)."""
    steps, values = stage.series(key)
    if len(steps) == 1 and steps[0] > 0:
        return {"before": None, "after": values[0], "delta": None, "before_step": None, "after_step": steps[0]}
    after = values[-1] if len(steps) > 1 else None
    return {"before": values[0], "after": after, "delta": None if after is None else after - values[0],
            "before_step": steps[0], "after_step": steps[-1] if after is not None else None}


def stage_summary(stage: Stage) -> dict[str, Any]:
    times = [r["time"] for r in stage.rows if "time" in r]
    return {"folder": str(stage.folder), "steps": max((int(r["step"]) for r in stage.rows), default=0),
            "rows": len(stage.rows), "wall_s": max(times) - min(times) if times else None,
            "bad_lines": stage.bad_lines, "dropped_values": stage.dropped_values,
            "eval": {k: before_after(stage, k) for k in eval_keys(stage)}}


def summary(run_dir: str | Path) -> dict[str, Any]:
    """``{"stages": {name: {steps, wall_s, rows, bad_lines, eval: {key: {before, after, delta, ...}}}},
    "missing": [...]}`` — the before/after table the pipeline prints and the page shows."""
    stages, missing = find_stages(run_dir)
    return {"run_dir": str(run_dir), "stages": {s.name: stage_summary(s) for s in stages}, "missing": missing}
