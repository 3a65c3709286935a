"""Tool calls in model text: parse them out of a generated turn, write them the way the template does.

A model calls a tool by writing, in the answer part of its turn (after ``</think>``)::

    <tool_call>
    {"name": "python", "arguments": {"code": "print(1234 * 5678)"}}
    </tool_call>

(``arguments`` may also be a JSON string holding the object), or Nemotron 3 Nano's XML form
``<tool_call><function=python><parameter=code>print(1)</parameter></function></tool_call>``
(parameter values are kept as strings: without the tool's schema a ``1`` could be either).

Model text is hostile: :func:`parse_turn` never raises, reads at most :data:`MAX_TEXT_CHARS`
characters with plain ``str.find`` scans (no regex, so no backtracking) and at most
:data:`MAX_BLOCKS` blocks, and says what was wrong with each bad block in one short line the
environment can show the model (``tool call 1: invalid JSON: Expecting value at char 12``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from posttrain.chat_template import split_reasoning
from posttrain.environments.multiturn import AssistantTurn, ToolCall

OPEN, CLOSE = "<tool_call>", "</tool_call>"
FUNCTION_OPEN, FUNCTION_CLOSE = "<function=", "</function>"
PARAMETER_OPEN, PARAMETER_CLOSE = "<parameter=", "</parameter>"
MAX_CALLS = 8  # calls run per turn; more are errors
MAX_BLOCKS = 16  # <tool_call> blocks read per turn; the rest are counted in one error line
MAX_TEXT_CHARS = 1_000_000  # longer turns are cut before parsing
MAX_CALL_CHARS = 32_000  # one block's body
MAX_NAME_CHARS = 128
_JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "a boolean", type(None): "null"}


@dataclass(frozen=True)
class ParsedTurn:
    """The answer text without its call blocks, the well-formed calls, one line per bad block."""

    content: str
    calls: tuple[ToolCall, ...]
    errors: tuple[str, ...]


def parse_turn(text: str) -> ParsedTurn:
    """Find the ``<tool_call>...</tool_call>`` blocks of ``text`` (see the module docstring).

    Malformed, unclosed or re-opened blocks and calls over :data:`MAX_CALLS` become error lines;
    ``content`` is ``text`` with every block read taken out, stripped. Linear in ``len(text)``.
    """
    if not isinstance(text, str):
        return ParsedTurn("", (), (f"turn text is a {type(text).__name__}, not a string",))
    errors: list[str] = []
    if len(text) > MAX_TEXT_CHARS:
        errors.append(f"turn of {len(text)} characters: only the first {MAX_TEXT_CHARS} were read")
        text = text[:MAX_TEXT_CHARS]
    pieces: list[str] = []
    calls: list[ToolCall] = []
    pos, close, blocks = 0, -1, 0
    while (start := text.find(OPEN, pos)) >= 0:
        if blocks == MAX_BLOCKS:
            errors.append(f"{text.count(OPEN, start)} more <tool_call> blocks ignored (at most {MAX_CALLS} calls a turn)")
            break
        blocks += 1
        pieces.append(text[pos:start])
        body = start + len(OPEN)
        if close < body:  # reused while re-opened blocks share one close: keeps 10,000 openings linear
            close = text.find(CLOSE, body)
        if close < 0:
            errors.append(f"tool call {blocks}: {OPEN} without {CLOSE}")
            pos = len(text)
            break
        reopen = text.find(OPEN, body, close)
        if reopen >= 0:
            errors.append(f"tool call {blocks}: {OPEN} opened again before {CLOSE}")
            pos = reopen
            continue
        pos = close + len(CLOSE)
        call = _parse_body(text[body:close])
        if isinstance(call, str):
            errors.append(f"tool call {blocks}: {call}")
        elif len(calls) == MAX_CALLS:
            errors.append(f"tool call {blocks}: over the limit of {MAX_CALLS} calls a turn, not run")
        else:
            calls.append(call)
    pieces.append(text[pos:])
    return ParsedTurn("".join(pieces).strip(), tuple(calls), tuple(errors))


def format_call(call: ToolCall) -> str:
    """``call`` as the chat template renders it in an assistant turn (the form the model is taught)."""
    body = json.dumps({"name": call.name, "arguments": call.arguments}, ensure_ascii=False)
    return f"{OPEN}\n{body}\n{CLOSE}"


def assistant_turn(text: str, *, thinking: bool, finish_reason: str) -> AssistantTurn:
    """A generated turn as the environment sees it: reasoning split off (``thinking``: the prompt
    ended inside ``<think>``), calls parsed from the answer part only, never raising."""
    if not isinstance(text, str):
        return AssistantTurn("", None, (), (f"turn text is a {type(text).__name__}, not a string",),
                             "", str(finish_reason))
    split = split_reasoning(text, started_in_reasoning=thinking)
    parsed = parse_turn(split.answer)
    return AssistantTurn(content=parsed.content, reasoning=split.reasoning, tool_calls=parsed.calls,
                         tool_call_errors=parsed.errors, text=text, finish_reason=str(finish_reason))


def assistant_message(turn: AssistantTurn) -> dict[str, Any]:
    """The chat message of ``turn`` (for ``Episode.messages`` and SFT traces): rendered by the template
    as ``<think>\\n{reasoning}\\n</think>\\n{content}`` then one :func:`format_call` block per call."""
    message: dict[str, Any] = {"role": "assistant", "content": turn.content}
    if turn.reasoning:
        message["reasoning_content"] = turn.reasoning
    if turn.tool_calls:
        message["tool_calls"] = [{"name": c.name, "arguments": c.arguments} for c in turn.tool_calls]
    return message


def _parse_body(body: str) -> ToolCall | str:
    """One block's body -> a call, or what is wrong with it (a short line)."""
    if len(body) > MAX_CALL_CHARS:
        return f"{len(body)} characters, over the {MAX_CALL_CHARS} a call may have"
    text = body.strip()
    if text.startswith(FUNCTION_OPEN):
        return _parse_xml(text)
    if text.startswith("```"):  # a fenced block: ```json\n{...}\n```
        text = text.removeprefix("```json").removeprefix("```").removesuffix("```").strip()
    if not text:
        return 'empty; write {"name": <function-name>, "arguments": <args-json-object>}'
    decoded = _json(text)
    if isinstance(decoded, str):
        return decoded
    obj = decoded[0]
    if not isinstance(obj, dict):
        return f'expected a JSON object {{"name": ..., "arguments": {{...}}}}, got {_kind(obj)}'
    args = obj.get("arguments", obj.get("parameters"))
    args = {} if args is None else args  # a call without arguments
    if isinstance(args, str):
        decoded = _json(args)
        if isinstance(decoded, str):
            return f'"arguments" is a string but not a JSON object ({decoded})'
        args = decoded[0]
    if not isinstance(args, dict):
        return f'"arguments" must be a JSON object, got {_kind(args)}'
    return _checked_call(obj.get("name"), args)


def _parse_xml(text: str) -> ToolCall | str:
    """``<function=NAME><parameter=K>V</parameter>...</function>`` (Nemotron 3 Nano's form)."""
    gt = text.find(">", len(FUNCTION_OPEN))
    end = text.rfind(FUNCTION_CLOSE)
    if gt < 0 or end < gt:
        return f"{FUNCTION_OPEN}NAME> not closed by {FUNCTION_CLOSE}"
    name, inner, args, p = text[len(FUNCTION_OPEN):gt].strip(), text[gt + 1:end], {}, 0
    while (a := inner.find(PARAMETER_OPEN, p)) >= 0:
        b = inner.find(">", a)
        if b < 0:
            return f"{PARAMETER_OPEN}NAME> without its closing >"
        key = inner[a + len(PARAMETER_OPEN):b].strip()
        c = inner.find(PARAMETER_CLOSE, b)
        if c < 0:
            return f"parameter {key!r:.40} not closed by {PARAMETER_CLOSE}"
        if key in args:
            return f"parameter {key!r:.40} given twice"
        value = inner[b + 1:c]
        args[key] = value.removeprefix("\n").removesuffix("\n")
        p = c + len(PARAMETER_CLOSE)
    return _checked_call(name, args)


def _checked_call(name: Any, args: dict[str, Any]) -> ToolCall | str:
    if not isinstance(name, str) or not name.strip():
        return f'missing "name" (the function to call, a string), got {_kind(name)}'
    if len(name) > MAX_NAME_CHARS:
        return f"function name of {len(name)} characters (at most {MAX_NAME_CHARS})"
    try:  # the call must render back (format_call) and tokenise: no lone surrogates from \ud800 escapes
        json.dumps({"name": name, "arguments": args}, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, ValueError, TypeError, RecursionError):
        return "invalid unicode or values in the call (a lone surrogate escape?)"
    return ToolCall(name=name, arguments=args)


def _json(text: str) -> tuple[Any] | str:
    """``(value,)`` or the decoding error as a short line."""
    try:
        return (json.loads(text),)
    except json.JSONDecodeError as exc:
        return f"invalid JSON: {exc.msg} at char {exc.pos}"
    except RecursionError:  # "[[[[..." deeper than the decoder's recursion limit
        return "invalid JSON: nested too deeply"
    except ValueError as exc:  # e.g. an integer over Python's digit limit
        return f"invalid JSON: {str(exc)[:80]}"


def _kind(value: Any) -> str:
    return _JSON_TYPES.get(type(value), type(value).__name__)
