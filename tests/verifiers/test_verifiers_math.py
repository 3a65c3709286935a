"""Math answers: extraction, equivalence classes, hostile inputs in bounded time, the CLI."""

from __future__ import annotations

import json
import time

import pytest

from posttrain.verifiers.math import MathChecker, MathConfig, extract_answer


@pytest.fixture(scope="module")
def checker():
    with MathChecker(MathConfig(timeout_s=4.0, parse_timeout_s=2)) as c:
        yield c


def test_extraction_order_and_methods():
    text = "First 3, then the answer is 7.\nFinally \\boxed{\\frac{1}{2}} and 99"
    assert extract_answer(text) == "\\frac{1}{2}"
    assert extract_answer(text, ("answer_is",)) == "7"
    assert extract_answer(text, ("last_number",)) == "99"
    assert extract_answer("\\boxed{x^{2}+1}") == "x^{2}+1"
    assert extract_answer("no digits here", ("boxed", "last_number")) is None
    assert extract_answer("total: 1,234.5") == "1234.5"
    with pytest.raises(ValueError, match="subset"):
        MathConfig(extract=("regex",))


@pytest.mark.parametrize("prediction,gold,correct", [
    ("\\boxed{\\frac{3}{4}}", "0.75", True),
    ("The answer is 0.75.", "\\frac34", True),
    ("\\boxed{50\\%}", "0.5", True),
    ("\\boxed{\\{1, 2\\}}", "\\{2,1\\}", True),
    ("\\boxed{[1, 2)}", "[1,2)", True),
    ("\\boxed{(1, 2]}", "[1,2)", False),
    ("\\boxed{\\frac{\\sqrt{2}}{2}}", "\\frac{1}{\\sqrt2}", True),
    ("so 12", "13", False),
    ("\\boxed{1,000}", "1000", True),
])
def test_equivalence(checker, prediction, gold, correct):
    result = checker.check(prediction, gold)
    assert result.correct is correct, result
    assert result.kind == ("correct" if correct else "wrong_answer")


def test_model_text_is_never_evaluated(checker, tmp_path):
    marker = tmp_path / "pwned"
    result = checker.check(f"\\boxed{{__import__('os').system('touch {marker}')}}", "1")
    assert not result.correct and not marker.exists()


@pytest.mark.parametrize("prediction", [
    "\\boxed{9^{9^{9^{9}}}}", "\\boxed{(10^7)!}", "\\boxed{" + "(" * 120 + "1" + ")" * 120 + "}", "7" * 10**6,
])
def test_hostile_inputs_end_in_bounded_time_with_zero(checker, prediction):
    start = time.monotonic()
    result = checker.check(prediction, "1")
    assert result.reward == 0.0 and not result.correct
    assert time.monotonic() - start < checker.config.timeout_s + 1.0
    assert checker.check("\\boxed{2}", "2").correct  # the next call works


def test_hard_deadline_kills_and_respawns():
    with MathChecker(MathConfig(timeout_s=0.5, parse_timeout_s=5, require_simplified=False)) as c:  # reach math-verify
        c.check("\\boxed{1}", "1")  # worker started
        start = time.monotonic()
        result = c.check("\\boxed{(10^7)!}", "1")
        assert result.kind == "timeout" and result.reward == 0.0 and c.restarts == 1
        assert time.monotonic() - start < 2.0
    with MathChecker(MathConfig(timeout_s=30)) as c:
        assert c.check("\\boxed{2}", "2").correct


def test_cli_verify_math(tmp_path, capsys):
    from posttrain.cli import main

    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prediction": "\\boxed{4}", "answer": "4"}, {"prediction": "it is 5", "answer": "4"},
            {"prediction": "The answer is $\\frac{1}{2}$", "answer": "0.5"}]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["verify", "math", "--pairs", str(pairs)]) == 0
    out = capsys.readouterr().out
    assert "accuracy: 0.6667 (2/3)" in out
    assert [json.loads(line)["correct"] for line in out.splitlines()[:3]] == [True, False, True]


@pytest.mark.parametrize("prediction, gold, kind", [
    ("The final answer is 13 + 7.", "20", "unsimplified"),  # the hack an RL policy found: restate the question
    ("\\boxed{(12 + 14) * 3 - 12}", "66", "unsimplified"),
    ("The answer is 2 \\times 10", "20", "unsimplified"),
    ("\\boxed{\\frac{1}{2} + \\frac{1}{4}}", "3/4", "unsimplified"),
    ("13 + 7 = 20", "20", "correct"),  # the working is fine when the final answer is the number
    ("The final answer is 80 * 10 = 800.", "800", "correct"),
    ("The final answer is 28 * 9 = 256.", "252", "wrong_answer"),
    ("\\boxed{20}", "20", "correct"),
    ("The answer is -5.", "-5", "correct"),
    ("\\boxed{\\frac{3}{4}}", "3/4", "correct"),
    ("\\boxed{3/4}", "3/4", "correct"),
    ("\\boxed{1,000}", "1000", "correct"),
    ("\\boxed{x^2 + 1}", "x^2+1", "correct"),  # symbolic golds keep math-verify's equivalence
])
def test_numeric_golds_need_a_computed_answer(checker, prediction, gold, kind):
    result = checker.check(prediction, gold)
    assert result.kind == kind and result.reward == float(kind == "correct"), result
    if kind == "unsimplified":
        assert MathChecker(MathConfig(require_simplified=False)).check(prediction, gold).correct  # math-verify alone
