"""`instruction_following`: IFEval-style verifiable constraints (length, keywords, format, case).

Data: an offline generator that writes a task on a topic with 2-4 constraints, together with a
gold response built to satisfy them; or a dataset in IFEval's shape (``prompt``,
``instruction_id_list``, ``kwargs``), e.g. google/IFEval. Every generated prompt requires
topic keywords, so empty or off-topic text cannot pass by satisfying constraints vacuously.
Reward is IFEval's strict prompt-level score (all constraints followed); the per-constraint
share is logged as a metric.
"""

from __future__ import annotations

import asyncio
import random
from typing import Any

from posttrain.environments.base import DefaultHooks, Sample, Score, ScoreKind, user_prompt
from posttrain.environments.data import DataError, DataSpec, OnInvalid, require

TOPICS = {
    "the ocean": ["ocean", "waves", "salt"], "a city park": ["park", "trees", "bench"],
    "learning to cook": ["kitchen", "recipe", "taste"], "the night sky": ["stars", "moon", "dark"],
    "a train journey": ["train", "window", "station"], "a rainy day": ["rain", "umbrella", "clouds"],
    "a small bakery": ["bread", "oven", "flour"], "mountain hiking": ["trail", "summit", "boots"],
}

# (instruction id, kwargs factory, text) -- only mutually compatible, constructively satisfiable ones.
_OPTIONAL: list[tuple[str, Any, str]] = [
    ("change_case:english_lowercase", lambda r: None, "Write everything in lowercase letters."),
    ("punctuation:no_comma", lambda r: None, "Do not use any commas."),
    ("length_constraints:number_words", lambda r: {"num_words": r.choice([20, 30, 40]), "relation": "at least"},
     "Use at least {num_words} words."),
    ("detectable_content:postscript", lambda r: {"postscript_marker": "P.S."},
     "End with a postscript starting with P.S."),
    ("detectable_format:title", lambda r: None, "Give it a title wrapped in double angular brackets, like <<title>>."),
    ("detectable_format:number_bullet_lists", lambda r: {"num_bullets": r.choice([2, 3])},
     "Include exactly {num_bullets} bullet points using markdown '* '."),
]


def generate_task(rng: random.Random) -> tuple[str, list[str], list[dict[str, Any] | None], str]:
    """(prompt, instruction ids, kwargs, gold response)."""
    topic, words = rng.choice(sorted(TOPICS.items()))
    keywords = rng.sample(words, 2)
    chosen = rng.sample(_OPTIONAL, rng.randint(1, 3))
    if {"change_case:english_lowercase", "detectable_content:postscript"} <= {c[0] for c in chosen}:
        chosen = [c for c in chosen if c[0] != "detectable_content:postscript"]  # "P.S." is not lowercase
    ids = ["keywords:existence"] + [c[0] for c in chosen]
    kwargs: list[dict[str, Any] | None] = [{"keywords": keywords}] + [c[1](rng) for c in chosen]
    texts = [f"Mention the words {keywords[0]!r} and {keywords[1]!r}."] + [
        c[2].format(**(kw or {})) for c, kw in zip(chosen, kwargs[1:])]
    prompt = f"Write a short piece about {topic}. " + " ".join(texts)
    return prompt, ids, kwargs, _gold(topic, keywords, dict(zip(ids, kwargs)))


def _gold(topic: str, keywords: list[str], spec: dict[str, Any]) -> str:
    body = (f"This is a short piece about {topic} that mentions {keywords[0]} and {keywords[1]} "
            f"and keeps going with plain simple words so that it is long enough for the reader today. "
            f"It was written to show how a careful answer can follow every rule that the task gives.")
    parts = []
    if "detectable_format:title" in spec:
        parts.append(f"<<{topic}>>")
    parts.append(body)
    bullets = spec.get("detectable_format:number_bullet_lists")
    if bullets:
        parts.append("\n".join(f"* point number {i + 1} about {keywords[0]}" for i in range(bullets["num_bullets"])))
    if "detectable_content:postscript" in spec:
        parts.append(f"P.S. thank you for reading about {keywords[1]}.")
    text = "\n\n".join(parts)
    return text.lower() if "change_case:english_lowercase" in spec else text


def task_from_row(row: Any) -> tuple[str, list[str], list[dict[str, Any] | None]]:
    from posttrain.verifiers.instructions import CHECKS

    problems = require(row, {"prompt": str, "instruction_id_list": list})
    if problems:
        raise DataError("; ".join(problems))
    ids = row["instruction_id_list"]
    unknown = [i for i in ids if i not in CHECKS]
    if not ids or unknown:
        raise DataError(f"field 'instruction_id_list' has unsupported ids {unknown or '(empty)'}")
    kwargs = row.get("kwargs") or [None] * len(ids)
    if not isinstance(kwargs, list) or len(kwargs) != len(ids):
        raise DataError(f"field 'kwargs' must be a list with one entry per instruction ({len(ids)})")
    return row["prompt"], list(ids), [k if isinstance(k, dict) else None for k in kwargs]


class InstructionEnv(DefaultHooks):
    """Instructions with checkable constraints (word counts, keywords, case, format).

    Options:
        source: IFEval-shaped rows (prompt, instruction_id_list, kwargs), e.g. google/IFEval; None = generated
        size: generated train tasks
        test_size: generated held-out tasks
        limit: first N rows of source (None = all)
        on_invalid: a row with an unknown or malformed constraint: skip (counted, logged) | error
        system: system prompt added to every sample (None = none)
    """

    name = "instruction_following"

    def __init__(self, source: str | None = None, size: int = 300, test_size: int = 60, limit: int | None = None,
                 on_invalid: OnInvalid = "skip", system: str | None = None) -> None:
        self.data = DataSpec(source, size, test_size, limit, on_invalid)
        self.system = system

    def samples(self, split: str, seed: int) -> list[Sample]:
        self.data.check_split(split)
        if self.data.source is not None:
            tasks = self.data.rows(split, task_from_row)
            return [Sample(id=f"{split}/{i}", messages=user_prompt(p, self.system),
                           answer={"ids": ids, "kwargs": kw}) for i, (p, ids, kw) in enumerate(tasks)]
        rng = random.Random(f"ifeval/{split}/{seed}")
        out = []
        for i in range(self.data.generated_count(split)):
            prompt, ids, kwargs, gold = generate_task(rng)
            out.append(Sample(id=f"gen/{split}/{seed}/{i}", messages=user_prompt(prompt, self.system),
                              answer={"ids": ids, "kwargs": kwargs}, info={"gold": gold}))
        return out

    @staticmethod
    def gold_answer(sample: Sample) -> str | None:
        return sample.info.get("gold")

    async def score(self, sample: Sample, completion: str) -> Score:
        from posttrain.verifiers.instructions import check_instructions

        if not completion.strip():
            return Score.failed(ScoreKind.INVALID, "empty answer", {"followed": 0.0})
        result = await asyncio.to_thread(check_instructions, completion, sample.answer["ids"], sample.answer["kwargs"])
        return Score(result.reward, {"followed": sum(result.followed) / len(result.followed)})
