"""Expected-score judging: read a GenRM's verdict off its token distribution, not its sampled digits.

A small GenRM's greedy JSON is coarse (``{"score_1": 5, "score_2": 1, ...}`` for almost every
pair) while its distribution over the digits still ranks responses: SmolLM2-135M after the
warm-up is at 0.50 held-out pairwise accuracy as written, 0.595 read by expectation with every
pair judged in both orders (``bench/genrm_expected_score.py``). With ``judge.scoring=expected``
each value the judge wrote as a single integer token is replaced by its expectation over the
in-range integers among the top-k tokens at that position (G-Eval style; the probabilities
renormalised over those digits).
A value that is not a single integer token (``3.5``, ``"4"`` split oddly) keeps the written
value, and the number of values read this way is reported. The text is parsed as usual first:
a format error stays a format error.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

from posttrain.chat_template import answer_offset
from posttrain.genrm.judge import JudgeCall
from posttrain.genrm.judge_format import (
    FALLBACK,
    KEYS,
    RANKING_RANGE,
    SCORE_RANGE,
    Judgement,
    Scoring,
    parse_judgement,
)
from posttrain.rollout.types import TopTokens

_VALUE_AFTER_KEY = {k: re.compile(rf"""["']?{k}["']?\s*:\s*["']?(?=[0-9])""") for k in KEYS}
_TRIM = " \t\r\n\"',}"


def _integer(text: object, low: float, high: float) -> int | None:
    """The integer a token's text stands for (``" 4"``, ``"4,"``), when it is one in range."""
    if not isinstance(text, str):
        return None
    core = text.strip(_TRIM)
    if not core.isascii() or not core.isdigit() or len(core) > 2:
        return None
    value = int(core)
    return value if low <= value <= high else None


def _position(offsets: list[int], char: int) -> int:
    """Index of the token whose text covers character ``char`` (offsets: each token's first char)."""
    lo, hi = 0, len(offsets) - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if offsets[mid] <= char:
            lo = mid
        else:
            hi = mid - 1
    return lo


def expected_value(top: dict[str, float], low: float, high: float) -> float | None:
    """E[value] over the in-range integer tokens of one position's distribution (renormalised)."""
    mass: dict[int, float] = {}
    for text, logprob in top.items():
        value = _integer(text, low, high)
        if value is not None and isinstance(logprob, (int, float)) and logprob <= 1e-6:  # not NaN, not > 0
            mass[value] = mass.get(value, 0.0) + math.exp(logprob)
    total = sum(mass.values())
    if total <= 0:
        return None
    return sum(v * p for v, p in mass.items()) / total


def expected_judgement(judgement: Judgement, top_tokens: TopTokens | None) -> tuple[Judgement, int]:
    """``judgement`` with each single-token integer value replaced by its expectation, and how many were.

    The last occurrence of each key in the answer (after the first ``</think>``) locates its value's token;
    a value whose token does not read as the integer the judgement holds is left as written.
    """
    if not judgement.parsed or not top_tokens:
        return judgement, 0
    try:
        texts = [str(t) for t, _ in top_tokens]
        offsets, at = [], 0
        for t in texts:
            offsets.append(at)
            at += len(t)
        text = "".join(texts)
        answer_start = answer_offset(text)
        values, read = {}, 0
        for key in KEYS:
            low, high = RANKING_RANGE if key == "ranking" else SCORE_RANGE
            matches = list(_VALUE_AFTER_KEY[key].finditer(text, answer_start))
            written = getattr(judgement, key)
            if not matches:
                continue
            k = _position(offsets, matches[-1].end())
            if _integer(texts[k], low, high) != written:
                continue
            value = expected_value(top_tokens[k][1], low, high)
            if value is not None:
                values[key], read = value, read + 1
        return replace(judgement, **values), read
    except Exception:  # noqa: BLE001 - odd engine output: keep the written verdict
        return judgement, 0


def judge_verdicts(calls: list[JudgeCall], scoring: Scoring = "generate") -> tuple[list[Judgement], float]:
    """The judgement of each call (a failed call is the fallback 3 / 3 / 3.5), and the share of all
    their values that were read as expectations (``scoring="expected"``; 0.0 otherwise)."""
    out, read = [], 0
    for call in calls:
        judgement = parse_judgement(call.text) if call.text is not None else FALLBACK
        if scoring == "expected":
            judgement, n = expected_judgement(judgement, call.top_tokens)
            read += n
        out.append(judgement)
    return out, read / (len(KEYS) * len(calls)) if calls else 0.0
