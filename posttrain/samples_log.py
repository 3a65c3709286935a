"""What the model wrote: a few rollouts of every RL step as text, next to the step's numbers.

``RUN/samples.jsonl`` gets one JSON line per logged rollout -- step, environment, prompt (its last
user turn), completion, reward, score kind and error, finish reason, reasoning tokens -- and the
loop shows the same rows in TensorBoard (text) and the report page shows the last step's. From each
group in draw order the best and the worst rollout are taken (one when all rewards are equal), so
the file shows what was rewarded next to what was not, until ``per_step`` rows.

Model output is hostile input: it is stored as JSON strings (any characters) and cut at
``MAX_CHARS``; whoever renders it escapes it (the report does).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"
MAX_CHARS = 4000  # of a prompt or completion kept per row


def _cut(text: str) -> str:
    return text if len(text) <= MAX_CHARS else text[:MAX_CHARS] + f"... [{len(text) - MAX_CHARS} more chars]"


def last_user_turn(messages: Sequence[dict[str, Any]]) -> str:
    """The prompt as a person reads it: the last user message's text."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return str(message.get("content") or "")
    return ""


def picked(rewards: Sequence[Sequence[float]], per_step: int) -> list[tuple[int, int]]:
    """(group, rollout) pairs: each group's best then worst rollout (first of equals), in group order."""
    out: list[tuple[int, int]] = []
    for i, group in enumerate(rewards):
        if len(out) >= per_step:
            break
        if not group:
            continue
        best = max(range(len(group)), key=lambda j: group[j])
        worst = min(range(len(group)), key=lambda j: group[j])
        out += [(i, best)] + ([(i, worst)] if group[worst] != group[best] else [])
    return out[:per_step]


def sample_rows(step: int, drawn: Sequence[tuple[str, Any]], groups: Sequence[Sequence[Any]],
                scores: Sequence[Any], per_step: int) -> list[dict[str, Any]]:
    """Rows of a step: ``drawn`` = [(env name, sample)], ``groups`` = rollouts per prompt, ``scores``
    flat and prompt-major as :class:`posttrain.rlvr.scoring.Played` holds them."""
    at, grouped = 0, []
    for group in groups:
        grouped.append(list(scores[at:at + len(group)]))
        at += len(group)
    rows = []
    for i, j in picked([[s.reward for s in g] for g in grouped], per_step):
        rollout, score = groups[i][j], grouped[i][j]
        rows.append({"step": step, "env": drawn[i][0], "prompt": _cut(last_user_turn(drawn[i][1].messages)),
                     "completion": _cut(rollout.text), "reward": float(score.reward), "kind": str(score.kind.value),
                     "error": score.error, "finish_reason": rollout.finish_reason,
                     "reasoning_tokens": int(rollout.reasoning_tokens)})
    return rows


def append_rows(run_dir: str | Path, rows: Sequence[dict[str, Any]]) -> None:
    """Add ``rows`` to ``RUN/samples.jsonl`` (a failing write is logged, never raised: it must not stop a step)."""
    if not rows:
        return
    try:
        with open(Path(run_dir) / SAMPLES_FILE, "a") as f:
            f.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    except OSError as exc:
        log.warning("samples not written to %s: %s", run_dir, exc)


def read_rows(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every readable row of ``RUN/samples.jsonl`` (a torn last line from a crash is skipped)."""
    path = Path(run_dir) / SAMPLES_FILE
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and isinstance(row.get("reward"), (int, float)):
            rows.append(row)
    return rows


def _fence(text: str) -> str:
    """A backtick fence longer than any backtick run in ``text``, so the text cannot close it."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def as_markdown(rows: Sequence[dict[str, Any]]) -> str:
    """The rows for TensorBoard's text tab (markdown; fenced so model output is shown, not rendered)."""
    parts = []
    for r in rows:
        fence = _fence(r["prompt"] + r["completion"])
        parts.append(f"**{r['env']}** reward {r['reward']:.3f} ({r['kind']}{', ' + r['error'] if r['error'] else ''})\n\n"
                     f"{fence}\n{r['prompt']}\n{fence}\n\n{fence}\n{r['completion']}\n{fence}")
    return "\n\n---\n\n".join(parts)


class SampleLog:
    """Where a run's sample rows go: ``RUN/samples.jsonl`` and, through ``text_sink(step, tag, text)``
    (the run's :meth:`posttrain.metrics.MetricsLogger.log_text`), TensorBoard's text tab."""

    def __init__(self, run_dir: str | Path, per_step: int, text_sink: Any = None) -> None:
        self.run_dir, self.per_step, self.text_sink = Path(run_dir), per_step, text_sink

    def log(self, step: int, drawn: Sequence[tuple[str, Any]], groups: Sequence[Sequence[Any]],
            scores: Sequence[Any]) -> None:
        if self.per_step < 1:
            return
        try:
            rows = sample_rows(step, drawn, groups, scores, self.per_step)
        except Exception as exc:  # noqa: BLE001 - a sample log must never stop a step
            log.warning("step %d: samples not logged: %s: %s", step, type(exc).__name__, exc)
            return
        append_rows(self.run_dir, rows)
        if self.text_sink is not None and rows:
            self.text_sink(step, "samples", as_markdown(rows))
