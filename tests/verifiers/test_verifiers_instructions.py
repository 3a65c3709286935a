"""IFEval-style instruction checks and JSON Schema validation."""

from __future__ import annotations

import pytest

from posttrain.verifiers.instructions import CHECKS, check_instructions, check_json


def test_instruction_examples():
    text = "<<My Title>>\n* one\n* two\nhello world. second sentence!\nP.S. bye"
    result = check_instructions(
        text,
        ["detectable_format:title", "detectable_format:number_bullet_lists", "punctuation:no_comma",
         "length_constraints:number_words", "detectable_content:postscript", "keywords:existence"],
        [None, {"num_bullets": 2}, None, {"num_words": 5, "relation": "at least"}, {"postscript_marker": "P.S."},
         {"keywords": ["hello"]}],
    )
    assert result.follow_all and result.reward == 1.0
    result = check_instructions("Hello, World", ["punctuation:no_comma", "change_case:english_lowercase"])
    assert result.followed == [False, False] and result.reward == 0.0
    assert check_instructions('"quoted"', ["startend:quotation"]).follow_all
    assert check_instructions("... Is there anything else I can help with?", ["startend:end_checker"],
                              [{"end_phrase": "Is there anything else I can help with?"}]).follow_all
    assert not check_instructions("a a a", ["keywords:frequency"],
                                  [{"keyword": "a", "frequency": 3, "relation": "less than"}]).follow_all


def test_more_ifeval_ids():
    sections = "SECTION 1\nintro\nSECTION 2\nbody"
    assert check_instructions(sections, ["detectable_format:multiple_sections"],
                              [{"section_spliter": "SECTION", "num_sections": 2}]).follow_all
    assert check_instructions("Well. My answer is no.", ["detectable_format:constrained_response"]).follow_all
    text = "First para.\n\nSecond starts here.\n\nThird."
    kwargs = {"num_paragraphs": 3, "nth_paragraph": 2, "first_word": "second"}
    assert check_instructions(text, ["length_constraints:nth_paragraph_first_word"], [kwargs]).follow_all
    assert not check_instructions(text, ["length_constraints:nth_paragraph_first_word"],
                                  [dict(kwargs, nth_paragraph=3)]).follow_all
    assert check_instructions("one answer ****** another", ["combination:two_responses"]).follow_all
    assert not check_instructions("same ****** same", ["combination:two_responses"]).follow_all


def test_every_check_answers_a_bool_quickly_on_hostile_text():
    assert len(CHECKS) >= 20
    hostile = ("*" * 50_000) + ("[" * 50_000) + ("\n" * 50_000) + "a " * 100_000
    import time
    start = time.monotonic()
    check_instructions(hostile, ["punctuation:no_comma", "detectable_format:number_highlighted_sections",
                                 "detectable_content:number_placeholders", "length_constraints:number_paragraphs",
                                 "detectable_format:title"],
                       [None, {"num_highlights": 1}, {"num_placeholders": 1}, {"num_paragraphs": 1}, None])
    assert time.monotonic() - start < 5


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown instruction id 'nope'"):
        check_instructions("x", ["nope"])
    with pytest.raises(ValueError, match="one kwargs per id"):
        check_instructions("x", ["punctuation:no_comma"], [None, None])
    with pytest.raises(ValueError, match="relation must be"):
        check_instructions("x", ["length_constraints:number_words"], [{"num_words": 1, "relation": "about"}])


SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0}},
          "required": ["name", "age"], "additionalProperties": False}


def test_json_schema():
    assert check_json('{"name": "Ada", "age": 36}', SCHEMA).valid
    assert check_json('```json\n{"name": "Ada", "age": 36}\n```', SCHEMA).reward == 1.0
    bad = check_json('{"name": "Ada", "age": -1}', SCHEMA)
    assert bad.kind == "schema_violation" and "age" in bad.detail
    assert check_json("not json", SCHEMA).kind == "not_json"
    assert check_json("[" * 100_000 + "]" * 100_000, SCHEMA, max_chars=10**6).kind == "not_json"
    assert check_json('{"name": "' + "x" * 200_000 + '"}', SCHEMA).kind == "too_long"
    with pytest.raises(ValueError, match="invalid JSON schema"):
        check_json("{}", {"type": 12})
