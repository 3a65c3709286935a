"""A few rollouts of every RL step as text (posttrain.samples_log): which are picked, what a row
holds, hostile output kept whole but bounded, a torn file still read."""

from __future__ import annotations

import json

from posttrain.environments.base import Sample, Score, ScoreKind
from posttrain.rollout.types import Rollout
from posttrain.samples_log import (
    MAX_CHARS,
    append_rows,
    as_markdown,
    last_user_turn,
    picked,
    read_rows,
    sample_rows,
)


def rollout(text: str) -> Rollout:
    return Rollout(0, 0, [1], [2], [0.0], text, "stop", None, text, True, 3)


def test_each_group_gives_its_best_and_worst_until_the_limit():
    rewards = [[0.5, 0.5], [0.0, 1.0, 0.2], [1.0, 0.0]]
    assert picked(rewards, 10) == [(0, 0), (1, 1), (1, 0), (2, 0), (2, 1)]  # equal rewards: one row
    assert picked(rewards, 2) == [(0, 0), (1, 1)]
    assert picked([[], [0.3]], 4) == [(1, 0)] and picked(rewards, 0) == []


def test_rows_hold_the_prompt_completion_and_verdict():
    drawn = [("math", Sample("a", [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}])),
             ("code", Sample("b", [{"role": "user", "content": "write f"}]))]
    groups = [[rollout("\\boxed{4}"), rollout("5")], [rollout("x" * (MAX_CHARS + 10))]]
    scores = [Score(1.0), Score(0.0, error="no final answer"), Score.failed(ScoreKind.INFRA, "sandbox died")]
    rows = sample_rows(7, drawn, groups, scores, per_step=8)
    assert [(r["env"], r["prompt"], r["completion"], r["reward"], r["kind"]) for r in rows[:2]] == [
        ("math", "2+2?", "\\boxed{4}", 1.0, "ok"), ("math", "2+2?", "5", 0.0, "invalid")]
    assert rows[1]["error"] == "no final answer" and rows[2]["kind"] == "infra" and rows[0]["step"] == 7
    assert rows[2]["completion"].startswith("x" * MAX_CHARS) and rows[2]["completion"].endswith("[10 more chars]")
    assert last_user_turn([{"role": "assistant", "content": "hi"}]) == ""


def test_written_rows_read_back_and_a_torn_line_is_skipped(tmp_path):
    hostile = "\x00</td><script>alert(1)</script>\u202e" + "`" * 5
    rows = [{"step": 1, "env": "e", "prompt": "p", "completion": hostile, "reward": 0.0, "kind": "ok", "error": None}]
    append_rows(tmp_path, rows)
    with open(tmp_path / "samples.jsonl", "a") as f:
        f.write('{"step": 2, "env": "e", "prom')  # a crash mid-write
    assert read_rows(tmp_path) == rows
    assert json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])["completion"] == hostile
    text = as_markdown(rows)
    assert "``````\n" + hostile + "\n``````" in text  # the fence is longer than any backtick run inside
    append_rows(tmp_path / "missing" / "dir", rows)  # an unwritable folder is a warning, not an error
    assert read_rows(tmp_path / "nothing") == []
