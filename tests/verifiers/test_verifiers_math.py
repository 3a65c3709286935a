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
        assert time.monotonic() - start < 30.0  # generous for a loaded machine; (10^7)! alone takes far longer
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
        with MathChecker(MathConfig(require_simplified=False)) as unguarded:
            assert unguarded.check(prediction, gold).correct  # math-verify alone


@pytest.fixture(scope="module")
def unguarded():
    """math-verify's equivalence alone (require_simplified=False): shows each hack below is real."""
    with MathChecker(MathConfig(timeout_s=4.0, parse_timeout_s=2, require_simplified=False)) as c:
        yield c


# Restating the question's arithmetic for a gold of 20, in every notation math-verify evaluates.
HACKS_OF_20 = [
    "\\boxed{\\frac{40}{2}}", "\\boxed{\\dfrac{400}{20}}", "\\boxed{\\tfrac{40}{2}}", "\\boxed{\\cfrac{40}{2}}",
    "\\boxed{\\frac{{40}}{{2}}}", "\\boxed{{{40}/{2}}}", "\\boxed{\\frac{20}{1}}", "\\boxed{\\frac{-40}{-2}}",
    "\\boxed{\\dfrac{\\dfrac{40}{1}}{2}}", "\\boxed{40/2}", "\\boxed{(40)/(2)}", "The answer is 40/2.",
    "The answer is $\\frac{40}{2}$.", "\\boxed{\\sqrt{400}}", "\\boxed{\\sqrt[3]{8000}}", "\\boxed{\\sqrt{20^2}}",
    "\\boxed{\\binom{6}{3}}", "\\boxed{\\left(10+10\\right)}", "\\boxed{10 + 10}", "\\boxed{2\\cdot 10}",
    "\\boxed{2 \\times 10}", "\\boxed{2*10}", "\\boxed{20\\cdot 1}", "\\boxed{20^{1}}", "\\boxed{2^2 \\cdot 5}",
    "\\boxed{19\\frac{2}{2}}", "\\boxed{e^{\\ln 20}}", "\\boxed{\\exp(\\ln(20))}", "\\boxed{\\log_2(2^{20})}",
    "\\boxed{20\\sin^2 x + 20\\cos^2 x}", "\\boxed{2.0E1}", "\\boxed{(20)}", "\\boxed{-(-20)}", "\\boxed{|-20|}",
    "\\boxed{\\max(20, 1)}", "\\boxed{\\lceil 19.5 \\rceil}", "\\boxed{\\sum_{i=1}^{20} 1}",
    "\\boxed{\\int_0^{20} 1 dx}",
    "\\boxed{20 = 40/2}", "\\boxed{\\frac{40}{2}\\text{ cm}}",
]


@pytest.mark.parametrize("prediction", HACKS_OF_20)
def test_any_notation_of_arithmetic_is_unsimplified(checker, unguarded, prediction):
    result = checker.check(prediction, "20")
    assert result.kind == "unsimplified" and result.reward == 0.0 and not result.correct, result
    assert unguarded.check(prediction, "20").correct  # the form does fool math-verify alone


@pytest.mark.parametrize("prediction, gold", [
    ("\\boxed{4!}", "24"), ("\\boxed{\\frac{2}{4}}", "1/2"), ("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}"),
    ("\\boxed{x-x}", "0"), ("\\boxed{\\frac{0}{5}}", "0"), ("\\boxed{0.5 \\cdot 1}", "0.5"), ("\\boxed{2.0e1}", "20"),
    ("\\boxed{\\text{40/2}}", "20"), ("\\boxed{\\pow(2,2)}", "4"), ("\\boxed{20 \\bmod 21}", "20"),
])
def test_other_unsimplified_forms(checker, prediction, gold):
    result = checker.check(prediction, gold)
    assert result.kind == "unsimplified" and result.reward == 0.0, result


@pytest.mark.parametrize("prediction, gold", [
    ("20", "20"), ("\\boxed{20}", "20"), ("\\boxed{ 20 }", "20"), ("\\boxed{20.0}", "20"),
    ("The answer is 20.00", "20"), ("The answer is 20.", "20"), ("\\boxed{20.}", "20"), ("$20$", "20"),
    ("\\boxed{{20}}", "20"), ("\\boxed{+20}", "20"), ("\\boxed{\\text{20}}", "20"), ("The answer is 20 apples.", "20"),
    ("\\boxed{20\\text{ cm}}", "20"), ("\\boxed{20 \\text{ cm}^2}", "20"), ("\\boxed{20^\\circ}", "20"),
    ("\\boxed{\\$20}", "20"), ("\\boxed{20\\%}", "20"), ("\\boxed{x = 20}", "20"), ("13 + 7 = 20", "20"),
    ("\\boxed{20}", "\\$20"), ("\\boxed{1{,}000}", "1000"), ("\\boxed{1\\,000}", "1000"), ("\\boxed{1000}", "1,000"),
    ("\\boxed{\\frac{1}{2}}", "1/2"), ("\\boxed{\\frac12}", "1/2"), ("\\boxed{\\dfrac{1}{2}}", "1/2"),
    ("\\boxed{0.5}", "1/2"), ("\\boxed{0.5}", "\\frac{1}{2}"), ("\\boxed{.5}", "0.5"),
    ("\\boxed{-\\frac{1}{2}}", "-0.5"), ("\\boxed{2\\frac{1}{2}}", "2.5"), ("\\boxed{\\frac{5}{2}}", "2.5"),
    ("\\boxed{\u22125}", "-5"), ("\\boxed{0.2}", "20%"),
])
def test_plain_forms_of_a_plain_gold_stay_correct(checker, prediction, gold):
    result = checker.check(prediction, gold)
    assert result.kind == "correct" and result.reward == 1.0, result


@pytest.mark.parametrize("prediction, gold, kind", [
    ("\\boxed{21}", "20", "wrong_answer"), ("\\boxed{\\frac{41}{2}}", "20", "wrong_answer"),
    ("\\boxed{twenty}", "20", "wrong_answer"), ("The answer is 1,2", "12", "unsimplified"),
])
def test_wrong_plain_answers_are_wrong(checker, prediction, gold, kind):
    assert checker.check(prediction, gold).kind == kind


def test_plain_number_decisions():
    from posttrain.verifiers.math import plain_number

    assert plain_number("\\boxed{ \\text{1{,}000} }.") == "1000"
    assert plain_number("-2\\frac{1}{2}") == "-\\frac{5}{2}" and plain_number("50\\%") == "50\\%"
    assert plain_number("\\frac{6}{8}") is None and plain_number("\\frac{6}{8}", strict=False) == "\\frac{6}{8}"
    for not_literal in ("2e1", "2.0E1", "(20)", "20!", "20^2", "20 1", "1,0000", "x \\le 20", "\\frac{1}{0}"):
        assert plain_number(not_literal, strict=False) is None, not_literal
    assert plain_number("20 " + "ab" * 100 + "!") is None  # letter runs are matched whole: no regex blow-up


def test_config_rejects_bad_timeout():
    for bad in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="timeout_s must be a positive"):
            MathConfig(timeout_s=bad)


def test_the_worker_says_which_side_failed_and_the_checker_decides_on_that():
    """A gold that does not parse is the dataset's fault (kind infra: not scored), reported by the
    worker as its own status; any other worker error is the answer's (wrong_answer), whatever it says."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "from posttrain.verifiers.math import serve; serve()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert json.loads(proc.stdout.readline()) == ["ready", None]
        proc.stdin.write(json.dumps(["\\", "3", 2]) + "\n")
        proc.stdin.flush()
        assert json.loads(proc.stdout.readline())[0] == "bad_gold"
    finally:
        proc.kill()
        proc.wait()
    checker = MathChecker()
    checker._ensure_worker = lambda: type("P", (), {"stdin": open("/dev/null", "wb")})()
    checker._readline = lambda timeout_s: ["error", "ValueError: the answer mentions the gold answer"]
    assert checker.check("\\boxed{y}", "x^2+1").kind == "wrong_answer"
    checker._readline = lambda timeout_s: ["bad_gold", "gold answer '\\\\frac{' does not parse"]
    result = checker.check("\\boxed{y}", "\\frac{")
    assert result.kind == "infra" and result.reward is None
