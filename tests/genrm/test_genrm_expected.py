"""Expected-score judging: verdicts read off the judge's token distribution, worked out by hand."""

from __future__ import annotations

import math

import pytest

from posttrain.genrm.backends import JudgeCall
from posttrain.genrm.expected_score import expected_judgement, expected_value, judge_verdicts
from posttrain.genrm.judge_format import FALLBACK, Judgement, parse_judgement
from posttrain.genrm.preference_data import PreferencePair, swapped
from posttrain.genrm.preference_env import order_averaged_accuracy, preference_metrics

L = math.log


def tokens(pieces: list[str], alternatives: dict[int, dict[str, float]]) -> list[tuple[str, dict[str, float]]]:
    """(token, {alternative: logprob}) per piece; the piece itself gets logprob 0 unless listed."""
    return [(p, alternatives.get(i, {p: 0.0})) for i, p in enumerate(pieces)]


JSON_PIECES = ['{"', "score", "_", "1", '":', " ", "5", ",", ' "', "score", "_", "2", '":', " ", "1", ",",
               ' "', "ranking", '":', " ", "2", "}"]


def test_expected_value_renormalises_over_in_range_integers():
    top = {"5": L(0.4), " 3": L(0.2), "1,": L(0.2), "6": L(0.1), "7": L(0.05), "x": L(0.05), "4": float("nan")}
    # in range 1-5: 5 (0.4), 3 (0.2), 1 (0.2); 6 and 7 are out of range, the rest are not numbers
    assert expected_value(top, 1, 5) == pytest.approx((5 * 0.4 + 3 * 0.2 + 1 * 0.2) / 0.8)
    assert expected_value(top, 1, 6) == pytest.approx((2.8 + 0.6) / 0.9)  # the ranking scale counts 6, not 7
    assert expected_value({"x": 0.0, "٣": 0.0, "12345": 0.0}, 1, 5) is None


def test_each_written_value_becomes_its_expectation():
    alt = {6: {"5": L(0.5), "4": L(0.3), "2": L(0.2)},  # score_1 -> 2.5 + 1.2 + 0.4 = 4.1
           14: {"1": L(0.6), "3": L(0.4)},  # score_2 -> 1.8
           20: {"2": L(0.5), "5": L(0.5)}}  # ranking -> 3.5
    written = parse_judgement("".join(JSON_PIECES))
    assert (written.score_1, written.score_2, written.ranking) == (5, 1, 2)
    judged, read = expected_judgement(written, tokens(JSON_PIECES, alt))
    assert read == 3 and judged.parsed
    assert (judged.score_1, judged.score_2, judged.ranking) == pytest.approx((4.1, 1.8, 3.5))


def test_reasoning_before_the_answer_is_not_read():
    pieces = ["<think>", '"score_1": ', "2", " maybe", "</think>", *JSON_PIECES]
    alt = {2: {"2": L(0.5), "1": L(0.5)}, 5 + 6: {"5": L(0.5), "3": L(0.5)}}
    judged, read = expected_judgement(parse_judgement("".join(pieces)), tokens(pieces, alt))
    assert judged.score_1 == pytest.approx(4.0) and read == 3  # the value after </think>, not the 1.5


def test_value_that_is_not_one_integer_token_keeps_its_written_value():
    pieces = ['{"score_1": ', "4", ', "score_2": ', "2", ', "ranking": ', "3", ".", "5", "}"]
    alt = {1: {"4": L(0.5), "2": L(0.5)}, 5: {"3": L(0.9), "4": L(0.1)}}
    judged, read = expected_judgement(parse_judgement("".join(pieces)), tokens(pieces, alt))
    assert read == 2 and judged.score_1 == pytest.approx(3.0) and judged.ranking == 3.5


def test_unparsed_missing_or_hostile_top_tokens_change_nothing():
    assert expected_judgement(FALLBACK, tokens(JSON_PIECES, {})) == (FALLBACK, 0)
    written = parse_judgement("".join(JSON_PIECES))
    assert expected_judgement(written, None) == (written, 0)
    assert expected_judgement(written, [(None, None)] * 3) == (written, 0)  # type: ignore[list-item]
    junk = tokens(JSON_PIECES, {6: {"5": "high", "2": -1e309, "4": 1e309, 3: 0.0}})  # type: ignore[dict-item]
    judged, read = expected_judgement(written, junk)
    assert judged.score_1 == 5 and read == 2  # nothing usable at score_1: written value kept


def test_judge_verdicts_fall_back_on_failed_calls_and_read_only_when_asked():
    top = tokens(JSON_PIECES, {6: {"5": L(0.5), "3": L(0.5)}})
    calls = [JudgeCall("".join(JSON_PIECES), None, 1, 0.0, top_tokens=top), JudgeCall(None, "timeout", 4, 1.0)]
    generated, rate = judge_verdicts(calls)
    assert rate == 0.0 and generated[0].score_1 == 5 and generated[1] == FALLBACK
    expected, rate = judge_verdicts(calls, "expected")
    assert rate == 0.5  # 3 of the 2 calls x 3 values
    assert expected[0].score_1 == pytest.approx(4.0) and expected[1] == FALLBACK


def _pair(i: int, ranking: float) -> PreferencePair:
    return PreferencePair(id=f"p{i}", context=[{"role": "user", "content": "q"}], response_1="a", response_2="b",
                          score_1=4.0, score_2=2.0, ranking=ranking)


def test_order_averaged_accuracy_cancels_position_bias():
    pairs = [p for pair in (_pair(0, 2), _pair(1, 5), _pair(2, 3.5)) for p in (pair, swapped(pair))]
    first_always = [Judgement(5, 1, 1, parsed=True)] * 6  # content-blind: always response 1
    assert order_averaged_accuracy(pairs, first_always) == 0.5
    assert preference_metrics(pairs, first_always)["pairwise_accuracy"] == 0.5
    # biased to position 1 by 1 point, yet prefers the better response by 0.5 in both orders
    biased = [Judgement(4.5, 3, 2, parsed=True), Judgement(4, 3.5, 3, parsed=True),  # pair 0: a better
              Judgement(4, 3.5, 3, parsed=True), Judgement(4.5, 3, 2, parsed=True),  # pair 1: b better
              Judgement(4, 3, 2, parsed=True), Judgement(4, 3, 2, parsed=True)]  # label tie: left out
    assert preference_metrics(pairs, biased)["pairwise_accuracy"] == 0.5  # each judgement alone: side 1
    assert preference_metrics(pairs, biased, both_orders=True)["pairwise_accuracy_both_orders"] == 1.0
    with pytest.raises(ValueError, match="pair, swapped pair"):
        order_averaged_accuracy(pairs[:3], biased[:3])


def test_answer_starts_after_the_first_close():
    """A stray ``</think>`` after the verdict (quoted by the judge) does not hide the verdict's tokens."""
    pieces = ["<think>", "r", "</think>", *JSON_PIECES, " a stray ", "</think>"]
    alt = {3 + 6: {"5": L(0.5), "3": L(0.5)}}
    judged, read = expected_judgement(parse_judgement("".join(pieces)), tokens(pieces, alt))
    assert read == 3 and judged.score_1 == pytest.approx(4.0)
