"""Human preference pairs for training a GenRM: HelpSteer3-shaped rows -> :class:`PreferencePair`.

A row holds a ``context`` (chat messages ending with a user turn), ``response1``, ``response2``
and ``overall_preference`` in -3..3 (negative: response 1 better; -3 "much better", -2
"better", -1 "slightly better", 0 "about the same"), as in ``nvidia/HelpSteer3`` (config
``preference``, splits ``train``/``validation``).

The GenRM's ranking (1 = response 1 much better ... 6 = response 2 much better) is the same
scale without the middle: -3,-2,-1 -> 1,2,3 and 1,2,3 -> 4,5,6. A 0 has no ranking on it; such
rows are dropped (``ties="skip"``, the reference GenRM is told to always pick a side) or kept
at the midpoint 3.5 (``ties="midpoint"``), where answering 3 or 4 each costs 0.5. Rows already
in the reference's GenRM form carry ``preference_ranking`` (1..6) and that is used as is.

Helpfulness (1-5) of each response, in order of preference:
1. ``helpfulness_1`` / ``helpfulness_2`` numbers (the reference's GenRM rows; the shipped set);
2. ``feedback1`` / ``feedback2`` annotator texts (HelpSteer3 ``feedback`` config), whose first
   sentence reads "The response is {not|slightly|partially|mostly|perfectly} helpful" -> 1..5,
   averaged over annotators;
3. otherwise derived from the preference alone, conservatively: both start at the neutral 3 and
   move apart by |overall_preference| (3 +- |p|/2), so only what the label says -- which side
   is better and by how much -- is claimed. Such pairs are marked ``scores_derived``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from posttrain.environments.data import DataError, OnInvalid, validate_rows
from posttrain.errors import NotFoundError

log = logging.getLogger(__name__)

SHIPPED = "posttrain:preferences"
Ties = Literal["skip", "midpoint"]
ROLES = ("system", "user", "assistant")
_FEEDBACK = re.compile(r"^\W*the response is (not|borderline unhelpful|slightly|partially|mostly|perfectly|extremely)"
                       r"(?: helpful)?\b", re.IGNORECASE)
_FEEDBACK_SCORE = {"not": 1, "borderline unhelpful": 2, "slightly": 2, "partially": 3, "mostly": 4, "perfectly": 5,
                   "extremely": 5}


@dataclass(frozen=True)
class PreferencePair:
    """A conversation, two responses, and their labels in the GenRM's own scales."""

    id: str
    context: list[dict[str, str]]  # chat messages ending with a user turn
    response_1: str
    response_2: str
    score_1: float  # helpfulness of response 1, 1-5
    score_2: float  # helpfulness of response 2, 1-5
    ranking: float  # 1 = response 1 much better ... 6 = response 2 much better (3.5: a tie)
    scores_derived: bool = False  # helpfulness derived from the preference, not labelled
    category: str = ""  # domain or generator category, for per-category metrics


def ranking_from_preference(preference: int) -> float | None:
    """HelpSteer3 ``overall_preference`` (-3..3) -> ranking (1..6); None for 0 (a tie)."""
    if preference not in range(-3, 4):
        raise ValueError(f"overall_preference must be an integer in -3..3 (got {preference!r})")
    if preference == 0:
        return None
    return float(preference + 4 if preference < 0 else preference + 3)


def preferred_side(ranking: float) -> int:
    """1 or 2 for the side a ranking prefers; 0 for a tie (3.5)."""
    return 1 if ranking < 3.5 else 2 if ranking > 3.5 else 0


def swapped(pair: PreferencePair) -> PreferencePair:
    """The same pair with the responses in the other order (ranking r -> 7 - r)."""
    return replace(pair, id=f"{pair.id}/swapped", response_1=pair.response_2, response_2=pair.response_1,
                   score_1=pair.score_2, score_2=pair.score_1, ranking=7.0 - pair.ranking)


def feedback_score(feedback: Any) -> float | None:
    """Mean helpfulness (1-5) read from annotator feedback texts; None when none can be read."""
    texts = [feedback] if isinstance(feedback, str) else feedback if isinstance(feedback, list) else []
    scores = []
    for text in texts:
        match = _FEEDBACK.match(text) if isinstance(text, str) else None
        if match:
            scores.append(_FEEDBACK_SCORE[match.group(1).lower()])
    return sum(scores) / len(scores) if scores else None


def pair_from_row(index: int, row: Any, ties: Ties = "skip") -> PreferencePair | None:
    """One row -> a pair (None: a tie dropped by ``ties="skip"``); DataError names the bad field."""
    if not isinstance(row, dict):
        raise DataError(f"row is {type(row).__name__}, not a mapping")
    context = _context(row.get("context"))
    responses = []
    for name in ("response1", "response2"):
        value = row.get(name)
        if not isinstance(value, str) or not value.strip():
            raise DataError(f"field {name!r} is {_describe(value)}, expected a non-empty string")
        responses.append(value)
    ranking, preference = _ranking(row, ties)
    if ranking is None:
        return None
    scores = [_number(row, f"helpfulness_{i}", 1, 5) for i in (1, 2)]
    if None in scores:
        scores = [feedback_score(row.get(f"feedback{i}")) for i in (1, 2)]
    derived = None in scores
    if derived:
        gap = abs(preference) if preference is not None else abs(ranking - 3.5) + 0.5 if ranking != 3.5 else 0.0
        better, worse = 3 + gap / 2, 3 - gap / 2
        scores = [better, worse] if preferred_side(ranking) == 1 else [worse, better]
    pair_id = row.get("id")
    return PreferencePair(id=str(pair_id) if pair_id not in (None, "") else str(index), context=context,
                          response_1=responses[0], response_2=responses[1], score_1=float(scores[0]),
                          score_2=float(scores[1]), ranking=ranking, scores_derived=derived,
                          category=str(row.get("category") or row.get("domain") or ""))


def _context(value: Any) -> list[dict[str, str]]:
    if isinstance(value, str) and value.strip():
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"field 'context' is {_describe(value)}, expected a non-empty list of {{role, content}}")
    messages = []
    for i, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(f"field 'context' message {i} is {_describe(message)}, expected {{role, content}}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"field 'context' message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"field 'context' message {i} content is {_describe(content)}, expected a string")
        messages.append({"role": role, "content": content})
    if messages[-1]["role"] != "user":
        raise DataError(f"field 'context' ends with a {messages[-1]['role']!r} turn; the last turn must be the user's")
    return messages


def _ranking(row: dict[str, Any], ties: Ties) -> tuple[float | None, int | None]:
    """(ranking or None for a skipped tie, the overall_preference it came from if any)."""
    if row.get("preference_ranking") is not None:
        return _number(row, "preference_ranking", 1, 6), None
    preference = row.get("overall_preference")
    if isinstance(preference, float) and preference.is_integer():
        preference = int(preference)
    if not isinstance(preference, int) or isinstance(preference, bool) or preference not in range(-3, 4):
        raise DataError(f"field 'overall_preference' is {_describe(preference)}, expected an integer in -3..3 "
                        "(or give 'preference_ranking' in 1..6)")
    ranking = ranking_from_preference(preference)
    if ranking is None and ties == "midpoint":
        ranking = 3.5
    return ranking, preference


def _number(row: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = row.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise DataError(f"field {name!r} is {_describe(value)}, expected a number in {low:g}..{high:g}")
    return float(value)


def _describe(value: Any) -> str:
    return "missing" if value is None else f"{type(value).__name__} {value!r:.60}"


# --------------------------------------------------------------------------- loading


def shipped_folder(name: str = "preferences") -> Path:
    """Folder of a preference set shipped in ``posttrain/data``."""
    return Path(str(resources.files("posttrain").joinpath("data", name)))


def load_pairs(source: str = SHIPPED, split: str = "train", *, limit: int | None = None, subset: str | None = None,
               on_invalid: OnInvalid = "skip", ties: Ties = "skip") -> list[PreferencePair]:
    """Pairs of ``split`` from the shipped set (``posttrain:NAME``), a local file or folder, or a hub id.

    A single local file is one split whatever ``split`` says; a folder or hub dataset without a
    ``test`` split serves ``validation`` for it (HelpSteer3's names). Bad rows are reported by
    row and field (``on_invalid``: skip them with a warning, or refuse the dataset).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test' (got {split!r})")
    if ties not in ("skip", "midpoint"):
        raise ValueError(f"ties must be skip or midpoint (got {ties!r})")
    return pairs_of_rows(read_rows(source, split, limit, subset), source, on_invalid=on_invalid, ties=ties)


def preference_prompts(source: str, split: str, limit: int | None = None) -> list[Any]:
    """The distinct conversations of a preference set as RL prompts (``Sample``), each with its preferred
    response as ``answer["reference"]`` (what a greedy held-out rollout is compared with)."""
    from posttrain.environments.base import Sample

    out, seen = [], set()
    for pair in load_pairs(source, split):
        key = repr(pair.context)
        if key in seen:
            continue
        seen.add(key)
        reference = pair.response_1 if preferred_side(pair.ranking) != 2 else pair.response_2
        out.append(Sample(f"{split}/{pair.id}", list(pair.context), {"reference": reference}))
    return out[:limit]


def pairs_of_rows(rows: list[Any], source: str, *, on_invalid: OnInvalid = "skip",
                  ties: Ties = "skip") -> list[PreferencePair]:
    """HelpSteer3-shaped ``rows`` (read from ``source``) -> pairs, bad rows reported by row and field."""
    pairs = validate_rows(rows, lambda i, row: pair_from_row(i, row, ties), source=source, on_invalid=on_invalid)
    kept = [p for p in pairs if p is not None]
    if len(kept) < len(pairs):
        log.info("%s: dropped %d tie(s) (overall_preference 0); set ties=midpoint to keep them", source,
                 len(pairs) - len(kept))
    if not kept:
        raise DataError(f"{source}: every row is a tie; set ties=midpoint to keep them")
    return kept


def read_rows(source: str, split: str, limit: int | None = None, subset: str | None = None) -> list[Any]:
    """The raw rows of ``split`` of a preference set (shipped, file, folder or hub id; a missing
    ``test`` split of a folder or hub set reads ``validation``)."""
    from posttrain.dataset_io import load_rows

    if source.startswith("posttrain:"):
        folder = shipped_folder(source.partition(":")[2])
        path = folder / f"{split}.jsonl"
        if not path.is_file():
            raise NotFoundError(f"no shipped preference set {source!r} (looked for {path})")
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return rows[:limit] if limit is not None else rows
    try:
        return load_rows(source, split=split, limit=limit, subset=subset)
    except DataError as first:
        if split != "test" or Path(source).expanduser().is_file():
            raise
        try:
            return load_rows(source, split="validation", limit=limit, subset=subset)
        except DataError:
            raise first from None
