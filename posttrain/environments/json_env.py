"""`json_schema`: the answer must be JSON valid against a given schema (jsonschema library).

Data: an offline generator of object schemas (required fields, types, enums, ranges, arrays)
with a description of the entity to fill in and a gold instance; or a dataset with a
``schema`` (JSON string or object) and a ``prompt`` (string or chat messages), optionally a
gold ``completion`` -- the shape of NousResearch/json-mode-eval.
"""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

from posttrain.environments.base import DefaultHooks, Sample, Score, ScoreKind, user_prompt
from posttrain.environments.data import DataError, DataSpec, OnInvalid

_FIELDS: dict[str, tuple[dict[str, Any], Any]] = {  # name -> (schema, example value factory)
    "name": ({"type": "string", "minLength": 1}, lambda r: r.choice(["Ada", "Lin", "Omar", "Sofia"])),
    "age": ({"type": "integer", "minimum": 0, "maximum": 120}, lambda r: r.randint(1, 99)),
    "email": ({"type": "string", "pattern": "^[^@\\s]+@[^@\\s]+$"}, lambda r: f"user{r.randint(1, 99)}@example.org"),
    "price": ({"type": "number", "exclusiveMinimum": 0}, lambda r: round(r.uniform(1, 500), 2)),
    "in_stock": ({"type": "boolean"}, lambda r: r.random() < 0.5),
    "tags": ({"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 4},
             lambda r: r.sample(["new", "sale", "eco", "gift", "local"], r.randint(1, 3))),
    "status": ({"type": "string", "enum": ["draft", "active", "archived"]},
               lambda r: r.choice(["draft", "active", "archived"])),
    "rating": ({"type": "integer", "minimum": 1, "maximum": 5}, lambda r: r.randint(1, 5)),
    "city": ({"type": "string", "minLength": 2}, lambda r: r.choice(["Lyon", "Osaka", "Lima", "Oslo"])),
}
_ENTITIES = ["a customer", "a product", "a library member", "a hotel review", "an online order"]


def generate_task(rng: random.Random) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(prompt, schema, gold instance)."""
    names = sorted(rng.sample(sorted(_FIELDS), rng.randint(3, 5)))
    required = sorted(rng.sample(names, max(2, len(names) - 1)))
    schema = {"type": "object", "properties": {n: _FIELDS[n][0] for n in names}, "required": required,
              "additionalProperties": False}
    gold = {n: _FIELDS[n][1](rng) for n in names}
    prompt = (f"Invent a record for {rng.choice(_ENTITIES)}. Reply with only a JSON object that is valid "
              f"under this JSON Schema:\n{json.dumps(schema)}")
    return prompt, schema, gold


def task_from_row(row: Any) -> tuple[Any, dict[str, Any], str | None]:
    if not isinstance(row, dict):
        raise DataError(f"row is {type(row).__name__}, not a mapping")
    schema = row.get("schema")
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as exc:
            raise DataError(f"field 'schema' is not valid JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise DataError("field 'schema' missing or not an object")
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise DataError(f"field 'schema' is not a valid JSON Schema: {exc.message}") from None
    prompt = row.get("prompt")
    if not (isinstance(prompt, str) and prompt.strip()) and not (isinstance(prompt, list) and prompt):
        raise DataError("field 'prompt' missing or empty (a string or a list of chat messages)")
    gold = row.get("completion")
    return prompt, schema, gold if isinstance(gold, str) else None


class JsonSchemaEnv(DefaultHooks):
    """Answers that must be JSON valid under a given JSON schema (checked with jsonschema).

    Options:
        source: rows with schema and prompt, e.g. NousResearch/json-mode-eval; None = generated schemas
        size: generated train schemas
        test_size: generated held-out schemas
        limit: first N rows of source (None = all)
        on_invalid: a row without a usable schema or prompt: skip (counted, logged) | error
        system: system prompt added to every sample (None = none)
    """

    name = "json_schema"

    def __init__(self, source: str | None = None, size: int = 300, test_size: int = 60, limit: int | None = None,
                 on_invalid: OnInvalid = "skip", system: str | None = None) -> None:
        self.data = DataSpec(source, size, test_size, limit, on_invalid)
        self.system = system

    def samples(self, split: str, seed: int) -> list[Sample]:
        self.data.check_split(split)
        if self.data.source is not None:
            tasks = self.data.rows(split, task_from_row)
            return [Sample(id=f"{split}/{i}", answer=schema, info={"gold": gold},
                           messages=p if isinstance(p, list) else user_prompt(p, self.system))
                    for i, (p, schema, gold) in enumerate(tasks)]
        rng = random.Random(f"json/{split}/{seed}")
        out = []
        for i in range(self.data.generated_count(split)):
            prompt, schema, gold = generate_task(rng)
            out.append(Sample(id=f"gen/{split}/{seed}/{i}", messages=user_prompt(prompt, self.system),
                              answer=schema, info={"gold": json.dumps(gold)}))
        return out

    @staticmethod
    def gold_answer(sample: Sample) -> str | None:
        return sample.info.get("gold")

    async def score(self, sample: Sample, completion: str) -> Score:
        from posttrain.verifiers.instructions import check_json

        result = await asyncio.to_thread(check_json, completion, sample.answer)
        if result.valid or result.kind == "schema_violation":
            return Score(result.reward)
        return Score(result.reward, error=result.kind, kind=ScoreKind.INVALID)  # no JSON object in the answer
