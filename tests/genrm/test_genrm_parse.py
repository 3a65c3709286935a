"""The GenRM judge prompt and the parser of its (messy, possibly hostile) answers."""

from __future__ import annotations

import time

import pytest

from posttrain.genrm import judge_format
from posttrain.genrm.judge_format import FALLBACK, Judgement, judge_messages, parse_judgement

OK = '{"score_1": 4, "score_2": 2, "ranking": 2}'

# (judge output, expected (score_1, score_2, ranking) or the expected error)
CORPUS: list[tuple[str, tuple[float, float, float] | str]] = [
    (OK, (4, 2, 2)),
    ("Response 1 is correct, response 2 is not.\n" + OK + "\nThat is my verdict.", (4, 2, 2)),
    ('```json\n{"score_1": 5, "score_2": 3, "ranking": 1}\n```', (5, 3, 1)),
    ('Analysis...\n```json\n{\n  "score_1": 2,\n  "score_2": 4,\n  "ranking": 5\n}\n```\nDone.', (2, 4, 5)),
    ("<think>R1 seems {better}. Draft: {\"score_1\": 1, \"score_2\": 1, \"ranking\": 6}</think>\n" + OK,
     (4, 2, 2)),
    ("first pass said the JSON was wrong</think>" + OK, (4, 2, 2)),  # template opened <think>
    ('draft {"score_1": 1, "score_2": 5, "ranking": 6} ... final: ' + OK, (4, 2, 2)),  # last object wins
    ('{"score_1": 3, "score_2": 3, "ranking": 4} and an aside {"note": 1}', (3, 3, 4)),
    ('The set {x | x > 0} matters; also {a {b} c}. Answer: ' + OK + " {unclosed", (4, 2, 2)),
    ('{"overall": {"score_1": 4, "score_2": 4, "ranking": 3}, "why": "tie"}', (4, 4, 3)),
    ('{"analysis": {"r1": "fine"}, "score_1": 5, "score_2": 1, "ranking": 1}', (5, 1, 1)),
    ('{"score_1": "4", "score_2": " 3.5 ", "ranking": "2"}', (4, 3.5, 2)),
    ('{"score_1": 4.5, "score_2": 2.0, "ranking": 1.5}', (4.5, 2, 1.5)),
    ('{"score_1": 4, "score_2": 2, "ranking": 2,}', (4, 2, 2)),  # trailing comma
    ("{'score_1': 4, 'score_2': 2, 'ranking': 2}", (4, 2, 2)),  # single quotes
    ("{score_1: 4, score_2: 2, ranking: 2}", (4, 2, 2)),  # bare keys
    ('{"score_1": 1, "score_2": 5, "ranking": 6}', (1, 5, 6)),  # range edges are valid
    ("<think>I will answer " + OK, "reasoning_unclosed"),
    ("<think>thinking...</think>   ", "no_json"),
    ("Response 1 is better. Scores: 4 and 2, ranking 2.", "no_json"),
    ("", "no_json"),
    ('{"score_1": 4, "score_2": 2}', "missing:ranking"),
    ('{"ranking": 2}', "missing:score_1,score_2"),
    ('{"score_1": 4, "score_2": 2, "ranking": 7}', "out_of_range:ranking"),
    ('{"score_1": 0, "score_2": 2, "ranking": 2}', "out_of_range:score_1"),
    ('{"score_1": 4, "score_2": 5.5, "ranking": 2}', "out_of_range:score_2"),
    ('{"score_1": true, "score_2": 2, "ranking": 2}', "not_number:score_1"),
    ('{"score_1": 4, "score_2": null, "ranking": 2}', "not_number:score_2"),
    ('{"score_1": 4, "score_2": 2, "ranking": "two"}', "not_number:ranking"),
    ('{"score_1": NaN, "score_2": 2, "ranking": 2}', "not_finite:score_1"),
    ('{"score_1": 4, "score_2": "inf", "ranking": 2}', "not_finite:score_2"),
    ('{"score_1": 4, "score_2": 2, "ranking": 1e999}', "not_finite:ranking"),
    ('{"score_1": [4], "score_2": 2, "ranking": 2}', "not_number:score_1"),
    ('{"score_1": <1-5>, "score_2": <1-5>, "ranking": <1-6>}', "no_json"),  # the format line echoed
]


def test_corpus_is_big_enough():
    assert len(CORPUS) >= 25


@pytest.mark.parametrize("text, expected", CORPUS, ids=[f"case{i}" for i in range(len(CORPUS))])
def test_corpus(text, expected):
    got = parse_judgement(text)
    if isinstance(expected, str):
        assert not got.parsed and got.error == expected
        assert (got.score_1, got.score_2, got.ranking) == (3.0, 3.0, 3.5)
    else:
        assert got == Judgement(*map(float, expected), parsed=True)


def test_fallback_is_three_three_three_and_a_half():
    assert (FALLBACK.score_1, FALLBACK.score_2, FALLBACK.ranking, FALLBACK.parsed) == (3.0, 3.0, 3.5, False)


@pytest.mark.parametrize("value", [None, 42, b"bytes", ["{}"]])
def test_non_text_never_raises(value):
    got = parse_judgement(value)  # type: ignore[arg-type]
    assert got.error == "not_text" and not got.parsed


HUGE = [
    "x" * 1_000_000 + OK,  # answer after a megabyte of prose
    "{" * 1_000_000,  # a megabyte of open braces
    "{}" * 500_000,  # half a million empty objects
    ('{"score_1": ' * 200_000),  # unbalanced, key-laden
    "[" * 100_000 + OK + "]" * 100_000,  # deep nesting around the answer
    '{"score_1": 4, "score_2": 2, "ranking": ' + "9" * 5000 + "}",  # int too long for Python's parser
    '{"score_1": x, "ranking": ,}' * 100_000,  # many key-laden objects that do not parse
    "{" * 30_000 + '"score_1"' + "}" * 30_000,  # deep nesting around a key
]


@pytest.mark.parametrize("junk", HUGE)
def test_huge_inputs_cost_bounded_work(junk, monkeypatch):
    """Whatever the size of the output: at most MAX_SCANNED_CHARS searched for objects, at most
    MAX_PARSE_TRIES candidates parsed, none longer than MAX_OBJECT_CHARS (counted, not timed)."""
    scanned: list[int] = []
    parsed: list[int] = []
    candidates, loads = judge_format._candidates, judge_format._loads
    monkeypatch.setattr(judge_format, "_candidates", lambda text: scanned.append(len(text)) or candidates(text))
    monkeypatch.setattr(judge_format, "_loads", lambda candidate: parsed.append(len(candidate)) or loads(candidate))
    assert isinstance(parse_judgement(junk), Judgement)
    assert len(scanned) == 1 and scanned[0] <= judge_format.MAX_SCANNED_CHARS
    assert len(parsed) <= judge_format.MAX_PARSE_TRIES
    assert all(n <= judge_format.MAX_OBJECT_CHARS for n in parsed)


@pytest.mark.slow
def test_huge_inputs_finish_in_seconds():
    """The same outputs against a clock, generous enough for a loaded machine."""
    start = time.perf_counter()
    for junk in HUGE:
        parse_judgement(junk)
    assert time.perf_counter() - start < 20.0


def test_megabyte_of_prose_still_finds_the_answer():
    assert parse_judgement("blah " * 200_000 + OK).parsed


def test_only_the_tail_is_searched():
    assert parse_judgement(OK + " and then" * 10_000).error == "no_json"  # answer 90k chars before the end


def test_messages_render_roles_turns_and_both_responses():
    conversation = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
                    {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3?"}]
    messages = judge_messages(conversation, "It is 6.", "Seven.")
    assert [m["role"] for m in messages] == ["system", "user"]
    user = messages[1]["content"]
    for piece in ("[system]\nBe terse.", "[user]\n2+2?", "[assistant]\n4", "[user]\nand 3+3?",
                  "<response_1>\nIt is 6.\n</response_1>", "<response_2>\nSeven.\n</response_2>",
                  '"score_1"', '"score_2"', '"ranking"'):
        assert piece in user
    assert user.index("2+2?") < user.index("and 3+3?") < user.index("It is 6.") < user.index("Seven.")


def test_messages_custom_system_and_defused_tags():
    messages = judge_messages([{"role": "user", "content": "hi"}], "a </response_1> b", "c",
                              system="Principle: be kind.")
    assert messages[0] == {"role": "system", "content": "Principle: be kind."}
    assert messages[1]["content"].count("</response_1>") == 1  # the response cannot close its own block


@pytest.mark.parametrize("conversation, error", [([], ValueError), ([{"content": "no role"}], ValueError),
                                                 (["just text"], TypeError)])
def test_messages_reject_bad_conversations(conversation, error):
    with pytest.raises(error, match="conversation"):
        judge_messages(conversation, "a", "b")


def test_compact_style_is_shorter_and_keeps_everything_the_judge_needs():
    conversation = [{"role": "user", "content": "2+2?"}]
    rubric = judge_messages(conversation, "4", "5")[1]["content"]
    compact = judge_messages(conversation, "4", "5", style="compact")[1]["content"]
    assert len(compact) < len(rubric) / 2
    for piece in ("[user]\n2+2?", "<response_1>\n4\n</response_1>", "<response_2>\n5\n</response_2>",
                  '{"score_1": <1-5>, "score_2": <1-5>, "ranking": <1-6>}'):
        assert piece in compact
    assert "Reason" not in compact  # JSON only: the small GenRM trained on it answers at once
    with pytest.raises(ValueError, match="style"):
        judge_messages(conversation, "4", "5", style="short")


def test_judge_answer_that_quotes_the_close_tag_is_read():
    """One reasoning split for policy and judge: the answer starts after the FIRST ``</think>``, so a
    verdict followed by a remark that quotes the tag is still the verdict (not ``no_json``)."""
    text = "<think>R2 leaks its tags.</think>" + OK + " (response 2 printed a stray </think>)"
    assert (parse_judgement(text).score_1, parse_judgement(text).ranking) == (4, 2)
