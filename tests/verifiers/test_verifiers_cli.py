"""`posttrain verify code|math` on bad input: a clear error naming file, line and field (exit 2)
before anything is scored, or kind "infra" for a problem that cannot score anyone."""

from __future__ import annotations

import json

import pytest

from posttrain.cli import main

GOOD = {"task_id": "T/0", "prompt": "def add(a, b):\n    \"\"\"a + b\"\"\"\n", "entry_point": "add",
        "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"}
RIGHT = "    return a + b\n"
SAMPLE = {"task_id": "T/0", "completion": RIGHT}


def write(path, rows) -> str:
    """One line per row; str rows are written as they are (raw text)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def no_scoring(monkeypatch):
    """Bad input must be refused before any program runs or any answer is checked."""
    def scored(*args, **kwargs):
        raise AssertionError("scoring started before the input was validated")

    monkeypatch.setattr("posttrain.verifiers.code.check_humaneval", scored)
    monkeypatch.setattr("posttrain.verifiers.math.check_pairs", scored)


def run_code(tmp_path, problems, completions, *extra: str) -> int:
    return main(["verify", "code", "--problems", write(tmp_path / "p.jsonl", problems),
                 "--completions", write(tmp_path / "c.jsonl", completions), "--out", str(tmp_path / "out.jsonl"),
                 "--timeout", "5", *extra])


def refused(capsys, *needles: str) -> str:
    err = capsys.readouterr().err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("value, shown", [(None, "null"), (3, "number"), (["def f(): pass"], "list")])
def test_prompt_that_is_not_a_string(tmp_path, capsys, no_scoring, value, shown):
    rc = run_code(tmp_path, [GOOD, {**GOOD, "task_id": "T/1", "prompt": value}], [SAMPLE])
    assert rc == 2
    refused(capsys, "p.jsonl:2", "'prompt'", "string", shown)


@pytest.mark.parametrize("value, shown", [(None, "null"), (7, "number"), (["x"], "list")])
def test_completion_that_is_not_a_string(tmp_path, capsys, no_scoring, value, shown):
    rc = run_code(tmp_path, [GOOD], [{"task_id": "T/0", "completion": RIGHT}, {"task_id": "T/0", "completion": value}])
    assert rc == 2
    refused(capsys, "c.jsonl:2", "'completion'", "string", shown)


def test_task_id_that_is_a_list(tmp_path, capsys, no_scoring):
    assert run_code(tmp_path, [{**GOOD, "task_id": ["T/0"]}], [SAMPLE]) == 2
    refused(capsys, "p.jsonl:1", "'task_id'")
    assert run_code(tmp_path, [GOOD], [{"task_id": ["T/0"], "completion": RIGHT}]) == 2
    refused(capsys, "c.jsonl:1", "'task_id'")


def test_missing_task_id_names_the_field(tmp_path, capsys, no_scoring):
    row = {k: v for k, v in GOOD.items() if k != "task_id"}
    assert run_code(tmp_path, [GOOD, row], [SAMPLE]) == 2
    refused(capsys, "p.jsonl:2", "'task_id' is missing")


def test_unknown_task_id_names_the_line(tmp_path, capsys, no_scoring):
    assert run_code(tmp_path, [GOOD], [SAMPLE, {"task_id": "T/9", "completion": RIGHT}]) == 2
    refused(capsys, "c.jsonl:2", "'T/9'", "p.jsonl")


@pytest.mark.parametrize("which", ["problems", "completions"])
def test_row_that_is_an_array(tmp_path, capsys, no_scoring, which):
    problems, completions = [GOOD], [SAMPLE]
    (problems if which == "problems" else completions).append("[1, 2]")
    assert run_code(tmp_path, problems, completions) == 2
    refused(capsys, f"{which[0]}.jsonl:2", "array", "object")


def test_duplicate_task_id(tmp_path, capsys, no_scoring):
    assert run_code(tmp_path, [GOOD, {**GOOD, "prompt": "def add(a, b):\n"}], [SAMPLE]) == 2
    refused(capsys, "p.jsonl:2", "'T/0'", "line 1")


def test_bad_utf8_names_file_and_line(tmp_path, capsys, no_scoring):
    problems = tmp_path / "p.jsonl"
    problems.write_bytes(json.dumps(GOOD).encode() + b"\n" + b'{"task_id": "caf\xe9"}\n')
    completions = write(tmp_path / "c.jsonl", [SAMPLE])
    assert main(["verify", "code", "--problems", str(problems), "--completions", completions]) == 2
    refused(capsys, "p.jsonl:2", "UTF-8")


def test_missing_input_file(tmp_path, capsys, no_scoring):
    completions = write(tmp_path / "c.jsonl", [SAMPLE])
    assert main(["verify", "code", "--problems", str(tmp_path / "nope.jsonl"), "--completions", completions]) == 2
    refused(capsys, "nope.jsonl")


def test_out_into_a_missing_folder_fails_before_scoring(tmp_path, capsys, no_scoring):
    problems = write(tmp_path / "p.jsonl", [GOOD])
    completions = write(tmp_path / "c.jsonl", [SAMPLE])
    out = tmp_path / "missing" / "out.jsonl"
    assert main(["verify", "code", "--problems", problems, "--completions", completions, "--out", str(out)]) == 2
    refused(capsys, "--out", str(tmp_path / "missing"))


def test_out_must_not_overwrite_an_input(tmp_path, capsys, no_scoring):
    problems = write(tmp_path / "p.jsonl", [GOOD])
    completions = write(tmp_path / "c.jsonl", [SAMPLE])
    assert main(["verify", "code", "--problems", problems, "--completions", completions, "--out", completions]) == 2
    refused(capsys, "--out")
    assert json.loads((tmp_path / "c.jsonl").read_text())["completion"] == RIGHT


@pytest.mark.parametrize("flag, value", [("--k", "0"), ("--k", "-1"), ("--k", "1,x"), ("--k", ""), ("--timeout", "0"),
                                         ("--timeout", "-1"), ("--timeout", "nan"), ("--timeout", "inf"),
                                         ("--workers", "0")])
def test_bad_numbers_are_refused_by_the_parser(tmp_path, capsys, no_scoring, flag, value):
    problems = write(tmp_path / "p.jsonl", [GOOD])
    completions = write(tmp_path / "c.jsonl", [SAMPLE])
    with pytest.raises(SystemExit) as exit_:
        main(["verify", "code", "--problems", problems, "--completions", completions, f"{flag}={value}"])
    assert exit_.value.code == 2
    refused(capsys, f"argument {flag}")


BROKEN = {  # task_id -> the broken part of the problem (each would score every model 0 if run)
    "test-null": {"test": None},
    "test-list": {"test": ["assert add(1, 2) == 3"]},
    "test-syntax": {"test": "def check(candidate):\n    assert candidate(1, 2) == = 3\n"},
    "test-no-import": {"test": "def check(candidate):\n    assert math.isclose(candidate(1, 2), 3)\n"},
    "test-bad-import": {"test": "import not_a_module_anywhere\n\n" + GOOD["test"]},
    "misspelled-entry-point": {"entry_point": "addd"},
}


def test_broken_problems_are_infra_not_a_models_zero(tmp_path, capsys):
    problems = [GOOD] + [{**GOOD, "task_id": t, **broken} for t, broken in BROKEN.items()]
    completions = [{"task_id": p["task_id"], "completion": RIGHT} for p in problems]
    assert run_code(tmp_path, problems, completions) == 1  # infra failures make the run exit 1
    rows = {r["task_id"]: r for r in map(json.loads, (tmp_path / "out.jsonl").read_text().splitlines())}
    assert rows["T/0"]["passed"] and rows["T/0"]["kind"] == "passed"
    for task_id in BROKEN:
        assert rows[task_id]["kind"] == "infra" and task_id in rows[task_id]["detail"], rows[task_id]
    captured = capsys.readouterr()
    assert "pass@1: 1.0000" in captured.out and f"infra failures (not scored): {len(BROKEN)}" in captured.out
    for task_id in BROKEN:
        assert task_id in captured.err  # each broken problem is named


def test_candidates_own_errors_stay_its_failure(tmp_path):
    completions = [{"task_id": "T/0", "completion": c} for c in (
        "    return a + b + undefined_name\n", "    import not_a_module_anywhere\n    return a + b\n",
        "    return str(a + b)\n", "    return a +\n")]
    assert run_code(tmp_path, [GOOD], completions) == 0
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert kinds == ["runtime_error", "runtime_error", "wrong_answer", "syntax_error"]


def run_math(tmp_path, rows, *extra: str) -> int:
    return main(["verify", "math", "--pairs", write(tmp_path / "pairs.jsonl", rows), *extra])


@pytest.mark.parametrize("row, needles", [
    ("20", ["pairs.jsonl:2", "number", "object"]),
    ('["\\\\boxed{1}", "1"]', ["pairs.jsonl:2", "array", "object"]),
    ({"prediction": None, "answer": "1"}, ["pairs.jsonl:2", "'prediction'", "null"]),
    ({"prediction": "1", "answer": ["1"]}, ["pairs.jsonl:2", "'answer'", "list"]),
    ({"prediction": "1"}, ["pairs.jsonl:2", "'answer' is missing"]),
    ({"prediction": "1", "answer": " "}, ["pairs.jsonl:2", "'answer'", "empty"]),
    ("[" * 100_000, ["pairs.jsonl:2", "nested too deeply"]),
    ('{"prediction": "1", "answer": ', ["pairs.jsonl:2", "not JSON"]),
], ids=["bare-number", "array", "prediction-null", "answer-list", "answer-missing", "answer-blank", "deep-nesting",
        "cut-line"])
def test_math_bad_rows(tmp_path, capsys, no_scoring, row, needles):
    assert run_math(tmp_path, [{"prediction": "\\boxed{1}", "answer": "1"}, row]) == 2
    refused(capsys, *needles)


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
def test_math_bad_timeout(tmp_path, capsys, no_scoring, value):
    with pytest.raises(SystemExit) as exit_:
        run_math(tmp_path, [{"prediction": "\\boxed{1}", "answer": "1"}], f"--timeout={value}")
    assert exit_.value.code == 2
    refused(capsys, "argument --timeout")


def test_math_numbers_are_fine_as_answers(tmp_path, capsys):
    assert run_math(tmp_path, [{"prediction": "\\boxed{20}", "answer": 20}, {"prediction": 0.5, "answer": "1/2"}]) == 0
    assert "accuracy: 1.0000 (2/2)" in capsys.readouterr().out


def test_empty_inputs_are_refused(tmp_path, capsys, no_scoring):
    assert run_math(tmp_path, []) == 2
    refused(capsys, "pairs.jsonl", "no rows")
    assert run_code(tmp_path, [GOOD], []) == 2
    refused(capsys, "c.jsonl", "no rows")
