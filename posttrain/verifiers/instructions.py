"""Verifiable instruction following (IFEval-style ids and kwargs) and JSON Schema checks.

Plain functions for the Environments issue: ``check_instructions(response, ids, kwargs)``
uses IFEval's instruction ids (``"punctuation:no_comma"``, ``"length_constraints:number_words"``…)
and keyword arguments so IFEval-format data works unchanged; ``check_json`` validates with the
``jsonschema`` library. Inputs are length-capped and every pattern is linear-time (no nested or overlapping
quantifiers), so a hostile response costs bounded time.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jsonschema

MAX_RESPONSE_CHARS = 200_000


def _compare(value: int, relation: str, target: int) -> bool:
    if relation in ("less than", "lt"):
        return value < target
    if relation in ("at least", "ge"):
        return value >= target
    if relation in ("at most", "le"):
        return value <= target
    if relation in ("exactly", "eq"):
        return value == target
    raise ValueError(f"relation must be 'less than', 'at least', 'at most' or 'exactly' (got {relation!r})")


def _words(text: str) -> list[str]:
    return re.findall(r"\b\w+\b", text)


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def _paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\s?\*\*\*\s?", text) if p.strip()]


def _strip_fence(text: str) -> str:
    text = text.strip()
    match = re.fullmatch(r"```(?:json|JSON)?\s*\n?(.*?)\n?```", text, flags=re.DOTALL)
    return match.group(1).strip() if match else text


def _is_json(text: str) -> bool:
    try:
        json.loads(_strip_fence(text))
    except (ValueError, RecursionError):
        return False
    return True


def _nth_paragraph_first_word(text: str, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if len(paragraphs) != num_paragraphs or not 1 <= nth_paragraph <= len(paragraphs):
        return False
    words = paragraphs[nth_paragraph - 1].split()
    return bool(words) and words[0].strip("\"'*.,:;!?()").lower() == first_word.lower()


def _two_responses(text: str) -> bool:
    parts = [p.strip() for p in text.split("******")]
    return len(parts) == 2 and all(parts) and parts[0] != parts[1]


# id -> check(response, **kwargs) -> bool. Kwarg names follow IFEval's data.
CHECKS: dict[str, Callable[..., bool]] = {
    "punctuation:no_comma": lambda r: "," not in r,
    "change_case:english_lowercase": lambda r: r == r.lower(),
    "change_case:english_capital": lambda r: r == r.upper(),
    "change_case:capital_word_frequency": lambda r, capital_frequency, capital_relation: _compare(
        sum(w.isupper() for w in _words(r)), capital_relation, capital_frequency),
    "length_constraints:number_words": lambda r, num_words, relation: _compare(len(_words(r)), relation, num_words),
    "length_constraints:number_sentences": lambda r, num_sentences, relation: _compare(
        len(_sentences(r)), relation, num_sentences),
    "length_constraints:number_paragraphs": lambda r, num_paragraphs: len(_paragraphs(r)) == num_paragraphs,
    "keywords:existence": lambda r, keywords: all(re.search(re.escape(k), r, re.IGNORECASE) for k in keywords),
    "keywords:forbidden_words": lambda r, forbidden_words: not any(
        re.search(r"\b" + re.escape(w) + r"\b", r, re.IGNORECASE) for w in forbidden_words),
    "keywords:frequency": lambda r, keyword, frequency, relation: _compare(
        len(re.findall(re.escape(keyword), r, re.IGNORECASE)), relation, frequency),
    "keywords:letter_frequency": lambda r, letter, let_frequency, let_relation: _compare(
        r.lower().count(letter.lower()), let_relation, let_frequency),
    "detectable_format:number_bullet_lists": lambda r, num_bullets: len(
        re.findall(r"^[ \t]*[*-][ \t]", r, flags=re.MULTILINE)) == num_bullets,
    "detectable_format:number_highlighted_sections": lambda r, num_highlights: len(
        [h for h in re.findall(r"\*([^\n*]+)\*", r) if h.strip()]) >= num_highlights,
    "detectable_format:title": lambda r: bool(re.search(r"<<[^\n<>]+>>", r)),
    "detectable_format:json_format": _is_json,
    "detectable_content:postscript": lambda r, postscript_marker: any(
        line.lstrip().lower().startswith(postscript_marker.lower()) for line in r.splitlines()),
    "detectable_content:number_placeholders": lambda r, num_placeholders: len(
        re.findall(r"\[[^\[\]\n]*\]", r)) >= num_placeholders,
    "startend:end_checker": lambda r, end_phrase: r.strip().lower().endswith(end_phrase.strip().lower()),
    "startend:quotation": lambda r: len(r.strip()) > 1 and r.strip()[0] == '"' and r.strip()[-1] == '"',
    "detectable_format:multiple_sections": lambda r, section_spliter, num_sections: len(
        re.split(r"\s?" + re.escape(section_spliter) + r"\s?\d+\s?", r)) - 1 >= num_sections,
    "detectable_format:constrained_response": lambda r: any(
        option in r for option in ("My answer is yes.", "My answer is no.", "My answer is maybe.")),
    "length_constraints:nth_paragraph_first_word": _nth_paragraph_first_word,
    "combination:two_responses": _two_responses,
    "combination:repeat_prompt": lambda r, prompt_to_repeat: r.strip().lower().startswith(
        prompt_to_repeat.strip().lower()),
}


@dataclasses.dataclass
class InstructionResult:
    """``follow_all`` is IFEval's strict prompt-level score; ``followed`` the per-instruction one."""

    follow_all: bool
    followed: list[bool]

    @property
    def reward(self) -> float:
        return float(self.follow_all)


def check_instructions(response: str, instruction_ids: Sequence[str],
                       kwargs: Sequence[Mapping[str, Any] | None] | None = None) -> InstructionResult:
    """Check ``response`` against each IFEval instruction id with its kwargs (None = no kwargs)."""
    kwargs = list(kwargs) if kwargs is not None else [None] * len(instruction_ids)
    if len(kwargs) != len(instruction_ids):
        raise ValueError(f"got {len(instruction_ids)} instruction ids but {len(kwargs)} kwargs: one kwargs per id")
    response = response[:MAX_RESPONSE_CHARS]
    followed = []
    for instruction_id, args in zip(instruction_ids, kwargs):
        check = CHECKS.get(instruction_id)
        if check is None:
            raise ValueError(f"unknown instruction id {instruction_id!r}; known: {sorted(CHECKS)}")
        args = {k: v for k, v in (args or {}).items() if v is not None}
        try:
            followed.append(bool(check(response, **args)))
        except TypeError as exc:
            raise ValueError(f"bad kwargs {args} for {instruction_id!r}: {exc}") from None
    return InstructionResult(all(followed), followed)


@dataclasses.dataclass
class JsonResult:
    """``kind``: valid, not_json, too_long or schema_violation; ``detail`` says where."""

    valid: bool
    kind: str
    detail: str = ""

    @property
    def reward(self) -> float:
        return float(self.valid)


def check_json(response: str, schema: Mapping[str, Any], *, max_chars: int = 100_000) -> JsonResult:
    """Does ``response`` (optionally in a ```json fence) parse as JSON valid under ``schema``?

    A broken *schema* is the dataset's fault and raises ValueError (never a silent 0).
    """
    try:
        validator_cls = jsonschema.validators.validator_for(schema)
        validator_cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ValueError(f"invalid JSON schema: {exc.message}; fix the dataset's schema") from None
    text = _strip_fence(response)
    if len(text) > max_chars:
        return JsonResult(False, "too_long", f"{len(text)} > {max_chars} chars")
    try:
        instance = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return JsonResult(False, "not_json", str(exc)[:200])
    try:
        error = jsonschema.exceptions.best_match(validator_cls(schema).iter_errors(instance))
    except RecursionError:
        return JsonResult(False, "schema_violation", "instance nested too deeply")
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        return JsonResult(False, "schema_violation", f"at {where}: {error.message}"[:300])
    return JsonResult(True, "valid")
