"""Run report: synthetic metrics.jsonl files -> HTML + PNGs, the before/after table, the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.report import build_report
from posttrain.report_data import find_stages, summary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_stage(folder: Path, rows: list[dict], extra_lines: tuple[str, ...] = (), config: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps(r) for r in rows] + list(extra_lines)
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if config:
        (folder / "config.yaml").write_text("run_dir: x\n")
    (folder / "tensorboard").mkdir(exist_ok=True)
    return folder


SFT_ROWS = [
    {"stage": "sft", "step": 0, "time": 1000.0, "eval/math/accuracy": 0.20},
    {"stage": "sft", "step": 1, "time": 1010.0, "train/loss": 2.0, "train/lr": 1e-5, "train/tokens_per_s": 900.0},
    {"stage": "sft", "step": 2, "time": 1020.0, "train/loss": 1.5, "train/lr": 1e-5, "train/tokens_per_s": 950.0},
    {"stage": "sft", "step": 3, "time": 1030.0, "train/loss": 1.0, "train/lr": 5e-6, "eval/math/accuracy": 0.35},
]


def rl_row(stage: str, step: int, t: float, **extra: float) -> dict:
    return {"stage": stage, "step": step, "time": t, "reward/mean": 0.1 * step, "env/math/reward": 0.1 * step,
            "env/code/reward": 0.05 * step, "env/math/pass_rate": 0.1 * step, "env/math/error_rate": 0.02,
            "rollout/reasoning_tokens_mean": 100.0 + step, "rollout/completion_tokens_mean": 150.0 + step,
            "time/gen_s": 3.0, "time/score_s": 0.5, "time/train_s": 2.0, "time/sync_s": 0.25, **extra}


RLVR_ROWS = [
    {"stage": "rlvr", "step": 0, "time": 2000.0, "eval/math/accuracy": 0.35, "eval/code/accuracy": 0.10,
     "eval/math/prompts": 100.0},
    rl_row("rlvr", 1, 2050.0),
    rl_row("rlvr", 2, 2100.0, **{"eval/math/accuracy": 0.50, "eval/code/accuracy": 0.40, "eval/math/prompts": 100.0}),
]
RLHF_ROWS = [
    {"stage": "rlhf", "step": 0, "time": 3000.0, "eval/math/accuracy": 0.50},
    rl_row("rlhf", 1, 3004.0, **{"genrm/reward_mean": 3.1, "genrm/position1_preference": 0.55}),
    rl_row("rlhf", 2, 3007.5, **{"genrm/reward_mean": 3.4, "genrm/position1_preference": 0.50,
                                 "eval/math/accuracy": 0.45}),
]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> tuple[Path, Path]:
    run = tmp_path_factory.mktemp("run")
    write_stage(run / "sft", SFT_ROWS)
    write_stage(run / "rlvr", RLVR_ROWS)
    write_stage(run / "rlhf", RLHF_ROWS)
    return run, build_report(run)


def images(index: Path) -> list[Path]:
    return [index.parent / src for src in re.findall(r'<img src="([^"]+)"', index.read_text())]


def test_three_stage_report_has_valid_pngs_and_is_self_contained(pipeline):
    run, index = pipeline
    assert index == run / "report" / "index.html" and index.is_file()
    pngs = images(index)
    names = {p.name for p in pngs}
    assert {"reward.png", "eval.png", "length.png", "genrm.png", "step_time.png", "sft.png"} <= names
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC, png
    page = index.read_text()
    assert "<script" not in page and "http://" not in page and "https://" not in page
    assert not list(run.glob(".report.tmp-*"))  # atomic build left nothing behind


def test_three_stage_before_after_table(pipeline):
    run, index = pipeline
    data = summary(run)
    assert list(data["stages"]) == ["sft", "rlvr", "rlhf"] and data["missing"] == []
    sft, rlvr, rlhf = (data["stages"][s] for s in ("sft", "rlvr", "rlhf"))
    assert sft["eval"]["eval/math/accuracy"] == pytest.approx(
        {"before": 0.20, "after": 0.35, "delta": 0.15, "before_step": 0, "after_step": 3})
    assert rlvr["eval"]["eval/code/accuracy"]["delta"] == pytest.approx(0.30)
    assert rlvr["eval"]["eval/math/accuracy"]["delta"] == pytest.approx(0.15)
    assert "eval/math/prompts" not in rlvr["eval"]  # a count, not a score
    assert rlhf["eval"]["eval/math/accuracy"]["delta"] == pytest.approx(-0.05)
    assert (sft["steps"], sft["wall_s"]) == (3, 30.0)
    assert (rlvr["steps"], rlvr["wall_s"]) == (2, 100.0)
    assert rlhf["wall_s"] == pytest.approx(7.5)
    page = index.read_text()
    assert "<td>0.350</td><td>0.500</td><td class=\"up\">+0.150</td>" in page
    assert "<td>0.500</td><td>0.450</td><td class=\"down\">-0.050</td>" in page
    assert "0:01:40" in page  # rlvr wall time, 100 s
    assert 'href="../rlvr/config.yaml"' in page and 'href="../rlhf/tensorboard"' in page


def test_single_stage_folder(tmp_path):
    stage = write_stage(tmp_path / "rlvr-x", RLVR_ROWS)
    index = build_report(stage)
    assert index == stage / "report" / "index.html"
    data = summary(stage)
    assert list(data["stages"]) == ["rlvr"] and data["missing"] == []  # name from the rows' "stage"
    assert data["stages"]["rlvr"]["eval"]["eval/code/accuracy"]["after"] == pytest.approx(0.40)
    assert all(p.read_bytes()[:8] == PNG_MAGIC for p in images(index))
    assert 'href="../config.yaml"' in index.read_text()


def test_missing_stages_and_a_stage_without_metrics(tmp_path):
    write_stage(tmp_path / "sft", SFT_ROWS)
    crashed = tmp_path / "rlvr"
    crashed.mkdir()
    (crashed / "config.yaml").write_text("run_dir: x\n")  # crashed before its first logged step
    index = build_report(tmp_path)
    data = summary(tmp_path)
    assert data["missing"] == ["rlhf"]
    assert data["stages"]["rlvr"] == {**data["stages"]["rlvr"], "steps": 0, "rows": 0, "wall_s": None, "eval": {}}
    page = index.read_text()
    assert "not run (no folder): rlhf" in page and "rlvr: no metrics.jsonl rows yet" in page
    assert {p.name for p in images(index)} == {"eval.png", "sft.png"}  # only what was logged is drawn


def test_garbled_lines_and_nan_are_skipped_and_counted(tmp_path):
    garbled = ("not json at all", '{"stage": "rlvr", "step": 3, "reward/mean": 0.5', "[1, 2]",
               '{"stage": "rlvr", "step": "three"}',
               '{"stage": "rlvr", "step": 4, "reward/mean": NaN, "env/math/reward": 0.25, "time/gen_s": Infinity}')
    stage = write_stage(tmp_path / "rlvr", RLVR_ROWS, extra_lines=garbled)
    [loaded], _ = find_stages(tmp_path)
    assert (loaded.bad_lines, loaded.dropped_values) == (4, 2)
    assert loaded.series("reward/mean") == ([1, 2], [pytest.approx(0.1), pytest.approx(0.2)])
    assert loaded.series("env/math/reward")[0] == [1, 2, 4]
    index = build_report(stage)
    page = index.read_text()
    assert "skipped 4 unparsable line(s)" in page and "left out 2 NaN/inf value(s)" in page
    assert summary(tmp_path)["stages"]["rlvr"]["steps"] == 4


def test_stage_with_only_eval_rows(tmp_path):
    write_stage(tmp_path / "rlhf", [{"stage": "rlhf", "step": 0, "time": 5.0, "eval/chat/accuracy": 0.25}])
    index = build_report(tmp_path)
    table = summary(tmp_path)["stages"]["rlhf"]
    assert table["eval"]["eval/chat/accuracy"] == {"before": 0.25, "after": None, "delta": None,
                                                    "before_step": 0, "after_step": None}
    assert (table["steps"], table["wall_s"]) == (0, 0.0)
    assert "<td>0.250</td><td>-</td><td>-</td>" in index.read_text()
    assert [p.name for p in images(index)] == ["eval.png"]


def test_a_figure_logged_only_after_training_is_an_after_value(tmp_path):
    """The starting judge wrote nothing readable, so it has no per-verdict accuracy; the trained one has."""
    write_stage(tmp_path / "genrm", [
        {"stage": "genrm", "step": 0, "time": 1.0, "eval/genrm_judge/format_error_rate": 1.0},
        {"stage": "genrm", "step": 4, "time": 9.0, "eval/genrm_judge/format_error_rate": 0.0,
         "eval/genrm_judge/pairwise_accuracy": 0.6}])
    table = summary(tmp_path)["stages"]["genrm"]["eval"]
    assert table["eval/genrm_judge/pairwise_accuracy"] == {"before": None, "after": 0.6, "delta": None,
                                                           "before_step": None, "after_step": 4}
    assert table["eval/genrm_judge/format_error_rate"]["delta"] == -1.0


def test_refuses_to_replace_a_folder_that_is_not_a_report(tmp_path):
    write_stage(tmp_path / "rlvr", RLVR_ROWS)
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not a report"):
        build_report(tmp_path, out=precious)
    assert (precious / "keep.txt").read_text() == "x"


def test_cli_prints_index_and_table(tmp_path, capsys):
    write_stage(tmp_path / "run" / "sft", SFT_ROWS)
    out = tmp_path / "elsewhere"
    assert main(["report", str(tmp_path / "run"), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(out / "index.html") and (out / "index.html").is_file()
    assert re.search(r"^sft\s+eval/math/accuracy\s+0\.200\s+0\.350\s+\+0\.150$", "\n".join(lines), re.MULTILINE)
    assert re.search(r"^rlvr\s+\(not run\)$", "\n".join(lines), re.MULTILINE)
    assert 'href="../run/sft/config.yaml"' in (out / "index.html").read_text()


def test_cli_error_names_the_folder(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nope")]) == 2
    assert "nope" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "no stage found" in capsys.readouterr().err


def test_samples_of_the_last_step_are_shown_escaped(tmp_path):
    from posttrain.samples_log import append_rows

    stage = write_stage(tmp_path / "rlvr", RLVR_ROWS)
    row = {"env": "math", "prompt": "2+2?", "reward": 0.0, "kind": "invalid", "error": "no <final> answer"}
    append_rows(stage, [{**row, "step": 1, "completion": "old step"},
                        {**row, "step": 2, "completion": "</td></table><script>alert(1)</script>"}])
    page = build_report(stage).read_text()
    assert "<h2>Samples</h2>" in page and "<h3>rlvr, step 2</h3>" in page and "old step" not in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "invalid: no &lt;final&gt; answer" in page
    assert "<h2>Samples</h2>" not in build_report(write_stage(tmp_path / "sft", SFT_ROWS)).read_text()
