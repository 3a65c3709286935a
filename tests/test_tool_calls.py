"""The tool-call parser: well-formed calls in both forms, one error line per bad block, hostile text."""

from __future__ import annotations

import json
import random
import time
from functools import lru_cache

import pytest

from posttrain import tool_calls as tc
from posttrain.environments.multiturn import AssistantTurn, ToolCall

CALL = '<tool_call>\n{"name": "python", "arguments": {"code": "print(1234 * 5678)"}}\n</tool_call>'
PY = ToolCall("python", {"code": "print(1234 * 5678)"})


def test_one_call_and_content():
    parsed = tc.parse_turn(f"Let me compute.\n{CALL}")
    assert parsed == tc.ParsedTurn("Let me compute.", (PY,), ())


def test_format_call_round_trips():
    call = ToolCall("f", {"s": "é ✓ \"q\" <x>", "n": [1, 2.5, None, True], "o": {"k": {}}})
    assert tc.parse_turn(tc.format_call(call)).calls == (call,)
    assert tc.format_call(PY) == CALL
    assert tc.format_call(call) == "<tool_call>\n" + json.dumps({"name": "f", "arguments": call.arguments},
                                                                 ensure_ascii=False) + "\n</tool_call>"


@pytest.mark.parametrize(("body", "call"), [
    ('{"name": "f", "arguments": "{\\"x\\": 1}"}', ToolCall("f", {"x": 1})),  # arguments as a JSON string
    ('{"name": "f"}', ToolCall("f", {})),  # a call without arguments
    ('{"name": "f", "arguments": null}', ToolCall("f", {})),
    ('{"name": "f", "parameters": {"x": 1}}', ToolCall("f", {"x": 1})),
    ('```json\n{"name": "f", "arguments": {"x": 1}}\n```', ToolCall("f", {"x": 1})),
    ('\n  {"name": "f", "arguments": {"x": "ü"}}  \n', ToolCall("f", {"x": "ü"})),
    ("<function=python>\n<parameter=code>\nprint(1)\nprint(2)\n</parameter>\n</function>",
     ToolCall("python", {"code": "print(1)\nprint(2)"})),
    ("<function=f><parameter=a>1</parameter><parameter=b> x </parameter></function>",
     ToolCall("f", {"a": "1", "b": " x "})),  # XML values stay strings
    ("<function=f>\n</function>", ToolCall("f", {})),
])
def test_accepted_forms(body, call):
    parsed = tc.parse_turn(f"<tool_call>{body}</tool_call>")
    assert parsed.calls == (call,) and parsed.errors == () and parsed.content == ""


@pytest.mark.parametrize(("body", "error"), [
    ('{"name": "f", "arguments": {"x": }}', "tool call 1: invalid JSON: Expecting value at char 33"),
    ("", 'tool call 1: empty; write {"name": <function-name>, "arguments": <args-json-object>}'),
    ('["f", {}]', 'tool call 1: expected a JSON object {"name": ..., "arguments": {...}}, got an array'),
    ('{"arguments": {}}', 'tool call 1: missing "name" (the function to call, a string), got null'),
    ('{"name": 3, "arguments": {}}', 'tool call 1: missing "name" (the function to call, a string), got a number'),
    ('{"name": "  ", "arguments": {}}', 'tool call 1: missing "name" (the function to call, a string), got a string'),
    ('{"name": "f", "arguments": [1]}', 'tool call 1: "arguments" must be a JSON object, got an array'),
    ('{"name": "f", "arguments": "x=1"}',
     'tool call 1: "arguments" is a string but not a JSON object (invalid JSON: Expecting value at char 0)'),
    ('{"name": "f", "arguments": "[1]"}', 'tool call 1: "arguments" must be a JSON object, got an array'),
    ('{"name": "' + "n" * 200 + '"}', "tool call 1: function name of 200 characters (at most 128)"),
    ('{"name": "f", "arguments": {"s": "\\ud800"}}',
     "tool call 1: invalid unicode or values in the call (a lone surrogate escape?)"),
    ("<function=f><parameter=a>1</function>", "tool call 1: parameter 'a' not closed by </parameter>"),
    ("<function=f><parameter=a>1</parameter><parameter=a>2</parameter></function>",
     "tool call 1: parameter 'a' given twice"),
    ("<function=f>", "tool call 1: <function=NAME> not closed by </function>"),
    ("<function=f><parameter=a</function>", "tool call 1: <parameter=NAME> without its closing >"),
    ("<function=><parameter=a>1</parameter></function>",
     'tool call 1: missing "name" (the function to call, a string), got a string'),
])
def test_malformed_block_is_one_error_line(body, error):
    parsed = tc.parse_turn(f"before <tool_call>{body}</tool_call> after")
    assert parsed.calls == () and parsed.errors == (error,)
    assert parsed.content == "before  after"


def test_bad_blocks_do_not_hide_good_ones():
    text = f"a {CALL} b <tool_call>{{oops</tool_call> c {CALL}"
    parsed = tc.parse_turn(text)
    assert parsed.calls == (PY, PY)
    assert parsed.errors == ("tool call 2: invalid JSON: Expecting property name enclosed in double quotes at char 1",)
    assert parsed.content == "a  b  c"


def test_unclosed_block():
    parsed = tc.parse_turn(f"{CALL}\ntext <tool_call>\n{{\"name\": \"f\", \"arguments\": {{}}}}")
    assert parsed.calls == (PY,) and parsed.errors == ("tool call 2: <tool_call> without </tool_call>",)
    assert parsed.content == "text"


def test_nested_and_duplicate_tags():
    parsed = tc.parse_turn(f"<tool_call><tool_call>{CALL[len('<tool_call>'):]}</tool_call>")
    assert parsed.calls == (PY,)
    assert parsed.errors == ("tool call 1: <tool_call> opened again before </tool_call>",)
    assert parsed.content == "</tool_call>"  # a stray close is plain text
    assert tc.parse_turn("</tool_call> no call").content == "</tool_call> no call"


def test_call_limits():
    parsed = tc.parse_turn(CALL * 20)
    assert parsed.calls == (PY,) * tc.MAX_CALLS
    over = [f"tool call {k}: over the limit of 8 calls a turn, not run" for k in range(9, 17)]
    assert list(parsed.errors) == over + ["4 more <tool_call> blocks ignored (at most 8 calls a turn)"]
    assert parsed.content.startswith("<tool_call>") and parsed.content.count("<tool_call>") == 4


def test_oversized_call():
    parsed = tc.parse_turn('<tool_call>{"name": "f", "arguments": {"x": "' + "a" * 40_000 + '"}}</tool_call>')
    assert parsed.calls == () and parsed.errors[0].endswith("characters, over the 32000 a call may have")


def test_not_a_string():
    assert tc.parse_turn(None).errors == ("turn text is a NoneType, not a string",)  # type: ignore[arg-type]
    turn = tc.assistant_turn(b"x", thinking=True, finish_reason="stop")  # type: ignore[arg-type]
    assert turn.tool_call_errors and turn.tool_calls == ()


@lru_cache(maxsize=1)
def _hostile_inputs() -> dict[str, str]:
    rng = random.Random(0)
    alphabet = "<>/{}[]\":,\\ntool_call=function parameter\u00e9\u4e2d\U0001f600\ud800\x00"
    junk = "".join(rng.choice(alphabet) for _ in range(1_000_000))
    return {
        "openings": "<tool_call>" * 90_000,
        "openings then one close": "<tool_call>" * 10_000 + "</tool_call>",
        "open close pairs": "<tool_call></tool_call>" * 40_000,
        "deep json": "<tool_call>" + "[" * 30_000 + "</tool_call>",
        "deep json string arguments": '<tool_call>{"name": "f", "arguments": "' + "[" * 30_000 + '"}</tool_call>',
        "xml parameter openings": "<tool_call><function=f>" + "<parameter=a>" * 2_000 + "</function></tool_call>",
        "xml openings with one close": ("<tool_call><function=f>" + "<parameter=a>" * 2_000 + "</parameter>"
                                        + "</function></tool_call>") * 30,
        "huge integer": '<tool_call>{"name": "f", "arguments": {"x": ' + "9" * 20_000 + "}}</tool_call>",
        "random junk": junk,
        "junk inside blocks": "".join(f"<tool_call>{junk[i:i + 5000]}</tool_call>" for i in range(0, 1_000_000, 5000)),
        "10 MB of junk": junk * 10,
    }


@pytest.mark.parametrize("name", list(_hostile_inputs()))
def test_hostile_text_never_raises_and_is_bounded(name):
    text = _hostile_inputs()[name]
    start = time.perf_counter()
    parsed = tc.parse_turn(text)
    turn = tc.assistant_turn(text, thinking=False, finish_reason="length")
    elapsed = time.perf_counter() - start
    assert elapsed < 5.0, f"{name}: {elapsed:.2f}s"  # linear scans: well under 0.1 s on a quiet core
    assert len(parsed.calls) <= tc.MAX_CALLS and len(parsed.errors) <= tc.MAX_BLOCKS + 2
    assert all(len(e) < 200 for e in parsed.errors)
    assert len(parsed.content) <= tc.MAX_TEXT_CHARS
    assert isinstance(turn, AssistantTurn) and turn.tool_calls == parsed.calls


def test_assistant_turn_splits_reasoning_first():
    text = f"Maybe {CALL} here?\n</think>\nLet me compute.\n{CALL}"
    turn = tc.assistant_turn(text, thinking=True, finish_reason="stop")
    assert turn.reasoning == f"Maybe {CALL} here?" and turn.content == "Let me compute."
    assert turn.tool_calls == (PY,) and turn.text == text and turn.finish_reason == "stop"
    unclosed = tc.assistant_turn(f"thinking about {CALL}", thinking=True, finish_reason="length")
    assert unclosed.tool_calls == () and unclosed.content == "" and unclosed.finish_reason == "length"
    off = tc.assistant_turn(f"{CALL}", thinking=False, finish_reason="stop")
    assert off.reasoning is None and off.tool_calls == (PY,)


def test_assistant_message():
    turn = tc.assistant_turn(f"r\n</think>\nok\n{CALL}", thinking=True, finish_reason="stop")
    assert tc.assistant_message(turn) == {"role": "assistant", "content": "ok", "reasoning_content": "r",
                                          "tool_calls": [{"name": "python", "arguments": PY.arguments}]}
    plain = tc.assistant_turn("4", thinking=False, finish_reason="stop")
    assert tc.assistant_message(plain) == {"role": "assistant", "content": "4"}
