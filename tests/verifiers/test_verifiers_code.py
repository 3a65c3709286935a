"""Code verdicts agree with a reference harness; value transport and I/O tests; the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from verifiers_humaneval_mini import COMPLETIONS, PROBLEMS

from posttrain.verifiers import _runner
from posttrain.verifiers.cli import pass_at_k
from posttrain.verifiers.code import (
    INFRA,
    PASSED,
    RUNTIME,
    SYNTAX,
    TIMEOUT,
    WRONG,
    check_function,
    check_humaneval,
    check_io,
    decode_value,
)
from posttrain.verifiers.sandbox import Isolation, Limits

LIMITS = Limits(wall_s=3)
BY_ID = {p["task_id"]: p for p in PROBLEMS}


def reference_harness(problem: dict, completion: str) -> bool:
    """human-eval's check_correctness, minus its sandboxing: exec everything, pass = no exception."""
    program = problem["prompt"] + completion + "\n" + problem["test"] + f"\ncheck({problem['entry_point']})\n"
    try:
        return subprocess.run([sys.executable, "-c", program], capture_output=True, timeout=3).returncode == 0
    except subprocess.TimeoutExpired:
        return False


@pytest.mark.parametrize("task_id,completion,expected", COMPLETIONS)
def test_matches_reference_harness(task_id, completion, expected):
    problem = BY_ID[task_id]
    assert reference_harness(problem, completion) == expected  # the fixture itself is right
    result = check_humaneval(problem, completion, limits=LIMITS)
    assert result.passed == expected, result
    assert result.kind != INFRA


def test_error_kinds():
    problem = BY_ID["Mini/0"]
    assert check_humaneval(problem, "    return xs[\n", limits=LIMITS).kind == SYNTAX
    assert check_humaneval(problem, "    return sorted(xs)\n", limits=LIMITS).kind == WRONG
    assert check_humaneval(problem, "    raise KeyError(1)\n", limits=LIMITS).kind == RUNTIME
    assert check_humaneval(problem, "    while True:\n        pass\n", limits=Limits(wall_s=1)).kind == TIMEOUT
    assert check_humaneval(problem, "    return list(xs)\n", limits=LIMITS).reward == 0.0


def test_values_round_trip_exactly():
    values = [None, True, 1, -(2**80), 0.1, float("inf"), "é\n", [1, (2, 3)], {"a": {1, 2}}, frozenset({4}),
              {(1, 2): [None]}]
    for value in values:
        back = decode_value(json.loads(json.dumps(_runner.encode(value))))
        assert back == value and type(back) is type(value) or isinstance(value, frozenset)
    assert decode_value(json.loads(json.dumps(_runner.encode(float("nan"))))) != 0.0  # nan stays nan
    for bad in ({"$evil": 1}, {"$int": [1]}, {"$set": [[1]]}, {"a": 1, "b": 2}):
        with pytest.raises(ValueError):
            decode_value(bad)


def test_kwargs_and_bool_vs_int():
    program = "def f(a, b=0):\n    return a == 1\n"
    assert check_function(program, "f", "assert f(1, b=2) is True\nassert f(2) is False\n", limits=LIMITS).passed


def test_test_that_never_calls_is_infra():
    result = check_function("def f():\n    return 1\n", "f", "x = 1\n", limits=LIMITS)
    assert result.kind == INFRA and result.reward is None


def test_missing_entry_point_fails():
    result = check_function("def g():\n    return 1\n", "f", "assert f() == 1\n", limits=LIMITS)
    assert not result.passed and result.kind == WRONG


def test_sandbox_that_cannot_start_is_infra_not_zero():
    broken = Isolation("rlimits", "/nonexistent/python3", drop_uid=False)
    result = check_function("def f():\n    return 1\n", "f", "assert f() == 1\n", limits=LIMITS, isolation=broken)
    assert result.kind == INFRA and result.reward is None and "could not start" in result.detail


def test_io_cases():
    program = "a, b = map(int, input().split())\nprint(a + b)\n"
    assert check_io(program, [("1 2\n", "3\n"), ("10 -3", "7")], limits=LIMITS).kind == PASSED
    assert check_io(program, [("1 2\n", "4\n")], limits=LIMITS).kind == WRONG
    assert check_io("import sys\nsys.exit(3)\n", [("", "")], limits=LIMITS).kind == RUNTIME
    assert check_io("print(input()[::-1])", [("abc", "cba")] * 3, limits=LIMITS).passed


def test_pass_at_k():
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)


def test_cli_verify_code(tmp_path, capsys):
    from posttrain.cli import main

    problems, completions = tmp_path / "problems.jsonl", tmp_path / "completions.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    completions.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n" for t, c, _ in COMPLETIONS))
    out = tmp_path / "results.jsonl"
    rc = main(["verify", "code", "--problems", str(problems), "--completions", str(completions),
               "--k", "1,2", "--out", str(out), "--timeout", "3"])
    printed = capsys.readouterr().out
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["passed"] for r in rows] == [expected for _, _, expected in COMPLETIONS]
    expected_p1 = sum(sum(e for t, _, e in COMPLETIONS if t == p["task_id"]) / sum(t == p["task_id"] for t, _, _ in
                      COMPLETIONS) for p in PROBLEMS) / len(PROBLEMS)
    assert f"pass@1: {expected_p1:.4f}" in printed and "pass@2:" in printed


ADD = {"task_id": "Add/0", "prompt": "def add(a, b):\n    \"\"\"a + b\"\"\"\n", "entry_point": "add",
       "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"}


@pytest.mark.parametrize("broken", [
    {"test": None}, {"test": ["assert add(1, 2) == 3"]},
    {"test": "def check(candidate):\n    assert candidate(1, 2) == = 3\n"},
    {"test": "def check(candidate):\n    assert math.isclose(candidate(1, 2), 3)\n"},  # uses a module it never imports
    {"test": "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert math.isclose(candidate(0, 1), 1)\n"},
    {"test": "import not_a_module_anywhere\n\ndef check(candidate):\n    assert candidate(1, 2) == 3\n"},
    {"test": "def check(candidate):\n    assert False, 'unfinished test'\n    assert candidate(1, 2) == 3\n"},
    {"entry_point": "addd"}, {"entry_point": "add me"}, {"prompt": None}, {"entry_point": 3},
], ids=["test-null", "test-list", "test-syntax-error", "test-no-import", "test-no-import-after-a-call",
        "test-bad-import", "test-fails-alone", "entry-point-misspelled", "entry-point-not-a-name", "prompt-null",
        "entry-point-number"])
def test_broken_problem_is_infra_not_a_zero(broken):
    result = check_humaneval({**ADD, **broken}, "    return a + b\n", limits=LIMITS)
    assert result.kind == INFRA and result.reward is None and "'Add/0'" in result.detail, result


def test_candidates_own_errors_stay_its_failure():
    def kind(completion: str, test: str = ADD["test"]) -> str:
        return check_humaneval({**ADD, "test": test}, completion, limits=LIMITS).kind

    assert kind("    return a + b + undefined_name\n") == RUNTIME
    assert kind("    import not_a_module_anywhere\n    return a + b\n") == RUNTIME
    assert kind("    return str(a + b)\n") == WRONG
    close = "def check(candidate):\n    assert abs(candidate(1, 2) - 3) < 1e-9\n"
    assert kind("    return str(a + b)\n", close) == WRONG
    assert kind("    return a + b\n\ndel add\n") == WRONG  # the candidate removed its own function


def test_check_function_with_a_broken_test_is_infra():
    for test in ("assert f( == 1\n", "assert 1 == 2\nassert f() == 1\n", "assert f() == undefined_constant\n"):
        result = check_function("def f():\n    return 1\n", "f", test, limits=LIMITS)
        assert result.kind == INFRA and result.reward is None, (test, result)


def test_fixture_problems_have_no_defect():
    from posttrain.verifiers.code import humaneval_defect

    assert [humaneval_defect(p) for p in PROBLEMS] == [None] * len(PROBLEMS)
