"""Run report: reads each stage's ``metrics.jsonl`` and writes ``RUN/report/index.html`` with PNG plots.

Works on a pipeline folder (``RUN/{sft,rlvr,rlhf}/``) or on one stage folder. Garbled lines and
non-finite values are skipped and counted on the page: a report of a crashed run is still a report.
The rows come from :mod:`posttrain.report_data`, the plots from :mod:`posttrain.report_plots`.
"""

from __future__ import annotations

import html
import itertools
import os
import time
from pathlib import Path
from typing import Any

from posttrain.atomic import atomic_dir, file_lock, remove_stale_tmp
from posttrain.errors import ConfigError
from posttrain.report_data import Stage, before_after, eval_keys, find_stages, stage_summary


def format_summary(data: dict[str, Any]) -> str:
    """The before/after table as aligned text, one line per stage and eval key."""
    width = max([32, *(len(k) for st in data["stages"].values() for k in st["eval"])])
    lines = [f"{'stage':8s} {'metric':{width}s} {'before':>8s} {'after':>8s} {'delta':>8s}"]
    for name, st in data["stages"].items():
        for key, ba in st["eval"].items():
            lines.append(f"{name:8s} {key:{width}s} {_num(ba['before']):>8s} {_num(ba['after']):>8s} "
                         f"{_num(ba['delta'], sign=True):>8s}")
        if not st["eval"]:
            lines.append(f"{name:8s} (no eval/ metrics)")
    lines += [f"{name:8s} (not run)" for name in data["missing"]]
    return "\n".join(lines)


def _num(value: float | None, sign: bool = False) -> str:
    return "-" if value is None else (f"{value:+.3f}" if sign else f"{value:.3f}")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def build_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the report folder (default ``RUN/report``) atomically; returns the path of index.html."""
    from posttrain.report_plots import draw_all  # matplotlib only when drawing

    run_dir = Path(run_dir)
    stages, missing = find_stages(run_dir)
    out = Path(out) if out is not None else run_dir / "report"
    if out.is_dir() and any(out.iterdir()) and not (out / "index.html").is_file():
        raise ConfigError(f"report folder {str(out)!r} exists and is not a report (no index.html); "
                          "pass --out with a new or empty folder")
    with file_lock(out.parent / f".{out.name}.lock"):
        remove_stale_tmp(out)
        with atomic_dir(out) as tmp:
            figures = draw_all(stages, tmp)
            page = render_html(run_dir, stages, missing, figures, out.resolve())
            (tmp / "index.html").write_text(page)
    return out / "index.html"


_CSS = """body{font-family:system-ui,sans-serif;max-width:1240px;margin:1.5em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
td:first-child,th,td.l{text-align:left}th{background:#f2f2f2}.up{color:#080}.down{color:#b00}
.note{background:#fff6d5;padding:.4em .8em;border-left:4px solid #e0b000}img{max-width:100%}code{background:#f4f4f4}
pre{white-space:pre-wrap;max-width:520px;margin:0;font-size:.85em}"""


def render_html(run_dir: Path, stages: list[Stage], missing: list[str], figures: list[tuple[str, str]],
                out: Path) -> str:
    """The page: notes, before/after table, stage table, figures, other metrics. ``out`` is the final folder."""
    body = [f"<h1>Run report: {html.escape(run_dir.resolve().name)}</h1>",
            f"<p>{html.escape(str(run_dir.resolve()))} — generated {time.strftime('%Y-%m-%d %H:%M:%S')}</p>"]
    body += [f'<p class="note">{html.escape(n)}</p>' for n in _notes(stages, missing)]
    body += ["<h2>Before / after</h2>", _before_after_table(stages), "<h2>Stages</h2>", _stage_table(stages, out)]
    for title, png in figures:
        body.append(f'<h2>{html.escape(title)}</h2>\n<img src="{html.escape(png)}" alt="{html.escape(title)}">')
    if not figures:
        body.append("<p>No plottable metrics yet.</p>")
    body.append(_samples(stages))
    body.append(_other_metrics(stages))
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>Run report</title>"
            f"<style>{_CSS}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


def _notes(stages: list[Stage], missing: list[str]) -> list[str]:
    notes = [f"{s.name}: skipped {s.bad_lines} unparsable line(s) of {s.folder / 'metrics.jsonl'}"
             for s in stages if s.bad_lines]
    notes += [f"{s.name}: left out {s.dropped_values} NaN/inf value(s)" for s in stages if s.dropped_values]
    notes += [f"{s.name}: no metrics.jsonl rows yet" for s in stages if not s.rows]
    if missing:
        notes.append(f"not run (no folder): {', '.join(missing)}")
    return notes


def _before_after_table(stages: list[Stage]) -> str:
    rows = []
    for s in stages:
        for key in eval_keys(s):
            ba = before_after(s, key)
            delta = ba["delta"]
            cls = "" if not delta else (' class="up"' if delta > 0 else ' class="down"')
            rows.append(f"<tr><td>{html.escape(s.name)}</td><td class=\"l\">{html.escape(key)}</td>"
                        f"<td>{_num(ba['before'])}</td><td>{_num(ba['after'])}</td>"
                        f"<td{cls}>{_num(delta, sign=True)}</td></tr>")
    if not rows:
        return "<p>No <code>eval/</code> metrics logged.</p>"
    head = "<tr><th>stage</th><th>metric</th><th>before</th><th>after</th><th>delta</th></tr>"
    return f"<table>{head}\n" + "\n".join(rows) + "</table>"


def _stage_table(stages: list[Stage], out: Path) -> str:
    head = ("<tr><th>stage</th><th>steps</th><th>wall time</th><th>rows</th><th>config</th>"
            "<th>tensorboard</th></tr>")
    rows = []
    for s in stages:
        st = stage_summary(s)
        links = [_link(s.folder / f, out) for f in ("config.yaml", "tensorboard")]
        rows.append(f"<tr><td>{html.escape(s.name)}</td><td>{st['steps']}</td><td>{_duration(st['wall_s'])}</td>"
                    f"<td>{st['rows']}</td><td class=\"l\">{links[0]}</td><td class=\"l\">{links[1]}</td></tr>")
    tb = ",".join(f"{s.name}:{s.folder.resolve() / 'tensorboard'}" for s in stages
                  if (s.folder / "tensorboard").is_dir())
    hint = f"<p>TensorBoard: <code>tensorboard --logdir_spec {html.escape(tb)}</code></p>" if tb else ""
    return f"<table>{head}\n" + "\n".join(rows) + "</table>" + hint


def _link(target: Path, out: Path) -> str:
    if not target.exists():
        return "(none)"
    rel = os.path.relpath(target.resolve(), out)
    return f'<a href="{html.escape(rel)}">{html.escape(rel)}</a>'


def _samples(stages: list[Stage]) -> str:
    """What the model wrote at each RL stage's last logged step (``samples.jsonl``; after a resume, the rows the
    run wrote last), escaped: it is model output."""
    from posttrain.samples_log import read_rows

    parts = []
    for s in stages:
        rows = read_rows(s.folder)
        if not rows:
            continue
        last = rows[-1]["step"]
        shown = list(itertools.takewhile(lambda r: r["step"] == last, reversed(rows)))[::-1]  # the latest write
        cells = "\n".join(
            f"<tr><td class=\"l\">{html.escape(str(r.get('env')))}</td><td>{float(r.get('reward', 0)):.3f}</td>"
            f"<td class=\"l\">{html.escape(str(r.get('kind')))}{_error(r.get('error'))}</td>"
            f"<td class=\"l\"><pre>{html.escape(str(r.get('prompt')))}</pre></td>"
            f"<td class=\"l\"><pre>{html.escape(str(r.get('completion')))}</pre></td></tr>"
            for r in shown)
        head = "<tr><th>env</th><th>reward</th><th>kind</th><th>prompt</th><th>completion</th></tr>"
        parts.append(f"<h3>{html.escape(s.name)}, step {last}</h3><table>{head}\n{cells}</table>")
    return "<h2>Samples</h2>\n" + "\n".join(parts) if parts else ""


def _error(error: object) -> str:
    return f": {html.escape(str(error))}" if error else ""


def _other_metrics(stages: list[Stage]) -> str:
    """Last/min/max of every metric, folded: the plots show the headline ones."""
    rows = []
    for s in stages:
        for key in sorted(s.metric_keys()):
            _, values = s.series(key)
            rows.append(f"<tr><td>{html.escape(s.name)}</td><td class=\"l\">{html.escape(key)}</td>"
                        f"<td>{values[-1]:.4g}</td><td>{min(values):.4g}</td><td>{max(values):.4g}</td></tr>")
    if not rows:
        return ""
    head = "<tr><th>stage</th><th>metric</th><th>last</th><th>min</th><th>max</th></tr>"
    return (f"<details><summary>All metrics ({len(rows)})</summary><table>{head}\n" + "\n".join(rows)
            + "</table></details>")
