"""The GenRM judge's prompt and the parser of its answer.

The judge reads a conversation and two candidate responses, reasons, then answers JSON
``{"score_1": 1-5, "score_2": 1-5, "ranking": 1-6}`` (helpfulness of each response; ranking
1 = response 1 much better ... 6 = response 2 much better), as the Nemotron GenRM does. Judge
output is untrusted text: :func:`parse_judgement` never raises, runs in bounded time, and
turns anything it cannot read into :data:`FALLBACK` (3 / 3 / 3.5, DESIGN.md §1) with a
named ``error``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import islice
from typing import Any, Literal

from posttrain.chat_template import split_reasoning

SCORE_RANGE = (1.0, 5.0)
RANKING_RANGE = (1.0, 6.0)
KEYS = ("score_1", "score_2", "ranking")
MAX_SCANNED_CHARS = 65_536  # the answer ends the output: only this tail is searched
MAX_OBJECT_CHARS = 2_048  # a judgement object is tiny; longer brace spans are skipped
MAX_PARSE_TRIES = 64  # json.loads attempts per output, newest candidates first


@dataclass(frozen=True)
class Judgement:
    """One comparison: helpfulness of the response shown first / second, and their ranking."""

    score_1: float
    score_2: float
    ranking: float
    parsed: bool
    error: str | None = None


FALLBACK = Judgement(3.0, 3.0, 3.5, parsed=False, error="unparsed")


def _failure(error: str) -> Judgement:
    return replace(FALLBACK, error=error)


JUDGE_SYSTEM = "You are an impartial, careful judge of AI assistant responses."

_INSTRUCTIONS = """\
Compare two candidate responses to the last user turn of the conversation below.

Helpfulness of each response, an integer 1-5 (score_1 for Response 1, score_2 for Response 2):
5 = fully does what was asked: correct, complete, clear
4 = helpful, with minor flaws
3 = partly helpful: misses part of the request or has a real mistake
2 = mostly unhelpful, though usable in a small way
1 = useless, wrong or harmful

Ranking, an integer 1-6 (no ties: even with equal scores, pick the better side):
1 = Response 1 is much better, 2 = Response 1 is better, 3 = Response 1 is slightly better,
4 = Response 2 is slightly better, 5 = Response 2 is better, 6 = Response 2 is much better

Judge correctness and how well each response serves the user. Length is not merit, and the
order of the responses means nothing."""

_ANSWER_FORMAT = """\
Reason briefly about each response's strengths and mistakes, then end with this JSON alone on the last line:
{"score_1": <1-5>, "score_2": <1-5>, "ranking": <1-6>}"""

# The same scales in ~115 instead of ~265 tokens, answer only: for small GenRMs trained on this
# format (on a CPU a judge prompt's length is most of the training and judging cost).
_COMPACT_INSTRUCTIONS = """\
Rate two responses to the last user turn. score_1, score_2: helpfulness 1-5 (5 = correct, complete, \
follows the instructions; 1 = wrong, a refusal or useless). ranking 1-6: 1 = Response 1 much better ... \
3 = slightly better, 4 = Response 2 slightly better ... 6 = much better."""

_COMPACT_ANSWER_FORMAT = 'Answer with the JSON only: {"score_1": <1-5>, "score_2": <1-5>, "ranking": <1-6>}'

# Scales named, not described (~40 instead of ~115 tokens): for a GenRM fine-tuned on this format, where the
# gold judgements teach the scale and every judge call pays for the prompt (main job, CPU).
_MINIMAL_INSTRUCTIONS = "Rate both responses to the last user turn."
_MINIMAL_ANSWER_FORMAT = "Answer JSON: score_1, score_2 (1-5), ranking (1-6; 1 = response_1 much better)."

PROMPT_STYLES = {"rubric": (_INSTRUCTIONS, _ANSWER_FORMAT), "compact": (_COMPACT_INSTRUCTIONS, _COMPACT_ANSWER_FORMAT),
                 "minimal": (_MINIMAL_INSTRUCTIONS, _MINIMAL_ANSWER_FORMAT)}
PromptStyle = Literal["rubric", "compact", "minimal"]
Scoring = Literal["generate", "expected"]  # the written values, or their expectations (genrm.expected_score)


def _fence(tag: str, text: str) -> str:
    """``text`` inside ``<tag>...</tag>``; a closing tag inside the text is defused."""
    text = text.replace(f"</{tag}>", f"<\\/{tag}>")
    return f"<{tag}>\n{text}\n</{tag}>"


def _render_conversation(conversation: list[dict[str, str]]) -> str:
    if not conversation:
        raise ValueError("conversation must hold at least one message (got [])")
    turns = []
    for k, message in enumerate(conversation):
        if not isinstance(message, dict):
            raise TypeError(f"conversation[{k}] must be a message dict (got {message!r:.80})")
        if not message.get("role"):
            raise ValueError(f"conversation[{k}] must have a 'role' (got {message!r:.80})")
        content = message.get("content")
        turns.append(f"[{message['role']}]\n{'' if content is None else str(content)}")
    return "\n\n".join(turns)


def check_prompt_style(style: str) -> str:
    """``style`` when it names a judge prompt style, else a ValueError listing them."""
    if style not in PROMPT_STYLES:
        raise ValueError(f"judge prompt style must be one of {sorted(PROMPT_STYLES)} (got {style!r})")
    return style


def judge_messages(conversation: list[dict[str, str]], response_1: str, response_2: str, *,
                   system: str | None = None, style: PromptStyle = "rubric") -> list[dict[str, str]]:
    """Chat messages asking a judge to compare ``response_1`` and ``response_2`` in ``conversation``.

    ``conversation`` is the prompt's messages (any roles, any number of turns) the responses answer;
    ``system`` replaces the judge's default system message (e.g. to add a principle); ``style``:
    ``rubric`` (full scale, reason then JSON), ``compact`` (short scale, JSON only) or ``minimal``
    (scales named, JSON only; for a judge fine-tuned on it). A GenRM is
    trained on one style and must judge with the same one.
    """
    instructions, answer_format = PROMPT_STYLES[check_prompt_style(style)]
    user = "\n\n".join([
        instructions,
        _fence("conversation", _render_conversation(conversation)),
        _fence("response_1", str(response_1)),
        _fence("response_2", str(response_2)),
        answer_format,
    ])
    return [{"role": "system", "content": JUDGE_SYSTEM if system is None else system},
            {"role": "user", "content": user}]


# ---------------------------------------------------------------------------------- parsing

_BRACE = re.compile(r"[{}]")
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
_BARE_KEY = re.compile(r"([{,]\s*)([A-Za-z_][A-Za-z_0-9]*)\s*:")


def _answer_part(text: str) -> str | None:
    """The text after the reasoning (``None`` when reasoning opened and never closed)."""
    split = split_reasoning(text, started_in_reasoning=False)
    return split.answer if split.reasoning_closed else None


def _candidates(text: str) -> Iterator[str]:
    """Balanced ``{...}`` spans (any depth) that mention a key, the last-closing first."""
    spans: list[tuple[int, int]] = []
    opens: list[int] = []
    for match in _BRACE.finditer(text):
        if match.group() == "{":
            opens.append(match.start())
        elif opens:
            start = opens.pop()
            if match.end() - start <= MAX_OBJECT_CHARS:
                spans.append((start, match.end()))
    for start, end in reversed(spans):
        candidate = text[start:end]
        if any(k in candidate for k in KEYS):
            yield candidate


def _loads(candidate: str) -> dict[str, Any] | None:
    """The object in ``candidate``; cheap repairs for single quotes, bare keys, trailing commas."""
    attempts = [candidate]
    repaired = _TRAILING_COMMA.sub(r"\1", candidate)
    if '"' not in repaired:
        repaired = repaired.replace("'", '"')
    repaired = _BARE_KEY.sub(r'\1"\2":', repaired)
    if repaired != candidate:
        attempts.append(repaired)
    for attempt in attempts:
        try:
            value = json.loads(attempt)
        except (ValueError, RecursionError):  # JSONDecodeError, int too long, nesting
            continue
        if isinstance(value, dict):
            return value
    return None


def _number(value: Any) -> float | None:
    """``value`` as a float: ints, floats and numeric strings; never bools or null."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and len(value) <= 32:
        try:
            return float(value.strip())
        except ValueError:
            return None
    return None


def _judgement(obj: dict[str, Any]) -> Judgement:
    values: list[float] = []
    for key in KEYS:
        value = _number(obj[key])
        if value is None:
            return _failure(f"not_number:{key}")
        if not math.isfinite(value):
            return _failure(f"not_finite:{key}")
        low, high = RANKING_RANGE if key == "ranking" else SCORE_RANGE
        if not low <= value <= high:
            return _failure(f"out_of_range:{key}")
        values.append(value)
    return Judgement(values[0], values[1], values[2], parsed=True)


def parse_judgement(text: str) -> Judgement:
    """The judgement at the end of a judge's output, or :data:`FALLBACK` with a named error.

    Reasoning (up to the first ``</think>``, as for any completion) is dropped; the last complete
    JSON object holding all three keys decides, wherever it sits (prose, code fences, nested in another object). Errors:
    ``not_text``, ``reasoning_unclosed``, ``no_json``, ``missing:<key>``, ``not_number:<key>``,
    ``not_finite:<key>``, ``out_of_range:<key>``.
    """
    try:
        if not isinstance(text, str):
            return _failure("not_text")
        answer = _answer_part(text)
        if answer is None:
            return _failure("reasoning_unclosed")
        partial: dict[str, Any] | None = None
        for candidate in islice(_candidates(answer[-MAX_SCANNED_CHARS:]), MAX_PARSE_TRIES):
            obj = _loads(candidate)
            if obj is None:
                continue
            if all(k in obj for k in KEYS):
                return _judgement(obj)
            if partial is None and any(k in obj for k in KEYS):
                partial = obj
        if partial is not None:
            return _failure("missing:" + ",".join(k for k in KEYS if k not in partial))
        return _failure("no_json")
    except Exception as exc:  # noqa: BLE001 - a parser bug must not kill a training step
        return _failure(f"parser_crash:{type(exc).__name__}")
