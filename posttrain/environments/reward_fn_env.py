"""An environment from a dataset and reward functions: no class to write (TRL ``reward_funcs``,
verl ``custom_reward_function``).

::

    environments:
      - name: reward_function
        options:
          dataset: data/prompts.jsonl        # JSONL/JSON/Parquet/CSV file, dataset folder or hub id
          prompt_column: prompt              # a string (the user turn) or a list of chat messages
          rewards: [my_rewards:exact, {function: my_rewards:brevity, weight: 0.2}]

A reward function takes keyword arguments and returns a number in [0, 1] (clamped; a bool is 1
or 0) or a :class:`~posttrain.environments.base.Score`; it may be ``async``. It receives those of these
it names -- all of them when it takes ``**kwargs``: ``completion`` (the answer text),
``prompt`` (the row's prompt as written), ``answer`` (the ``answer_column`` value, or None),
``sample``, and every column of the row by its name. Several functions are combined as the
weighted mean of their rewards (weights are shares), and each one's reward is logged as
``env/reward_function/reward_<name>``. A function that raises, hangs past ``timeout_s`` or
returns something that is not a finite number scores 0 as ``env_error`` (counted, never a crash).
``module:function`` imports from the current folder too, like ``python -m``.
"""

from __future__ import annotations

import asyncio
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from posttrain.dataset_io import load_rows, messages_of
from posttrain.environments.base import DefaultHooks, Messages, Sample, Score, ScoreKind, checked
from posttrain.environments.data import DataError, OnInvalid, validate_rows
from posttrain.errors import EnvironmentLoadError

class RewardSpec(BaseModel):
    """One reward function: ``module:function``, or ``{function: module:function, weight: w}``."""

    model_config = ConfigDict(extra="forbid")

    function: str = Field(description="module:function")
    weight: float = Field(1.0, gt=0, description="share of the combined reward")

    @model_validator(mode="before")
    @classmethod
    def _from_name(cls, data: Any) -> Any:
        return {"function": data} if isinstance(data, str) else data


@dataclass(frozen=True)
class _Reward:
    name: str
    call: Callable[..., Any]
    weight: float
    wants: frozenset[str] | None  # keyword arguments it takes; None = all (**kwargs)


def _load_reward(spec: str | dict[str, Any] | RewardSpec) -> _Reward:
    from posttrain.environments.registry import import_user_module

    spec = RewardSpec.model_validate(spec)
    module_name, sep, attr = spec.function.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reward {spec.function!r} must be module:function, e.g. my_rewards:exact_match")
    try:
        func = getattr(import_user_module(module_name), attr)
    except ImportError as exc:
        raise EnvironmentLoadError(f"reward {spec.function!r}: cannot import {module_name!r}: {exc}") from exc
    except AttributeError:
        raise EnvironmentLoadError(f"reward {spec.function!r}: {module_name!r} has no attribute {attr!r}") from None
    if not callable(func):
        raise ValueError(f"reward {spec.function!r} is a {type(func).__name__}, not a function")
    params = inspect.signature(func).parameters.values()
    wants = None if any(p.kind is p.VAR_KEYWORD for p in params) else frozenset(
        p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return _Reward(attr, func, spec.weight, wants)


def _prompt_messages(value: Any, field: str, system: str | None) -> Messages:
    messages = messages_of(value, field)
    if system and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}, *messages]
    return messages


class RewardFunctionEnv(DefaultHooks):
    """Prompts from a dataset, rewards from your functions (no environment class to write).

    Options:
        dataset: JSONL/JSON/Parquet/CSV file, dataset folder or hub id
        rewards: reward functions, each module:function or {function: module:function, weight: w}
        prompt_column: column holding the prompt: a string (the user turn) or a list of chat messages
        answer_column: column passed to the functions as answer (None, or a missing column: None)
        test_dataset: held-out prompts (None = the last test_fraction of dataset)
        test_fraction: share of dataset held out when test_dataset is None, in [0, 1)
        subset: hub dataset config
        limit: first N rows of dataset (None = all)
        on_invalid: a row without a usable prompt: skip (counted, logged) | error
        system: system message added to prompts that have none
        timeout_s: limit of one call of one function; past it the completion scores 0 (env_error)
    """

    name = "reward_function"

    def __init__(self, dataset: str, rewards: list[RewardSpec], prompt_column: str = "prompt",
                 answer_column: str | None = "answer", test_dataset: str | None = None, test_fraction: float = 0.1,
                 subset: str | None = None, limit: int | None = None, on_invalid: OnInvalid = "skip",
                 system: str | None = None, timeout_s: float = 30.0) -> None:
        if not rewards:
            raise ValueError("rewards must name at least one module:function")
        if not 0.0 <= test_fraction < 1.0 or timeout_s <= 0:
            raise ValueError(f"test_fraction must be in [0, 1) and timeout_s > 0 (got {test_fraction}, {timeout_s})")
        self.rewards = [_load_reward(r) for r in rewards]
        names = [r.name for r in self.rewards]
        if len(set(names)) != len(names):
            raise ValueError(f"reward functions need distinct names (got {names})")
        self.prompt_column, self.answer_column, self.system = prompt_column, answer_column, system
        self.timeout_s = timeout_s
        train = self._samples(dataset, "train", subset, limit, on_invalid)
        if test_dataset is not None:
            self._splits = {"train": train, "test": self._samples(test_dataset, "test", subset, limit, on_invalid)}
        else:
            held_out = int(len(train) * test_fraction)
            self._splits = {"train": train[:len(train) - held_out], "test": train[len(train) - held_out:]}

    def _samples(self, source: str, split: str, subset: str | None, limit: int | None,
                 on_invalid: OnInvalid) -> list[Sample]:
        def convert(i: int, row: Any) -> Sample:
            if not isinstance(row, dict) or self.prompt_column not in row:
                raise DataError(f"no column {self.prompt_column!r} (prompt_column)")
            answer = row.get(self.answer_column) if self.answer_column else None
            messages = _prompt_messages(row[self.prompt_column], self.prompt_column, self.system)
            return Sample(id=f"{self.name}/{split}/{i}", messages=messages,
                          answer=answer, info={"row": row})

        rows = load_rows(source, split=split, limit=limit, subset=subset)
        if rows and self.prompt_column not in rows[0]:
            raise DataError(f"{source} has no column {self.prompt_column!r} (prompt_column); its columns: "
                            f"{', '.join(map(str, rows[0]))}")
        return validate_rows(rows, convert, source=source, on_invalid=on_invalid)

    def samples(self, split: str, seed: int) -> list[Sample]:
        if split not in self._splits:
            raise ValueError(f"split must be 'train' or 'test' (got {split!r})")
        return list(self._splits[split])

    def gold_answer(self, sample: Sample) -> str | None:
        return None  # the functions decide what is right; `env check` runs its garbage checks only

    async def score(self, sample: Sample, completion: str) -> Score:
        row = sample.info.get("row", {})
        given = {**row, "completion": completion, "prompt": row.get(self.prompt_column),
                 "answer": sample.answer, "sample": sample}
        results = await asyncio.gather(*(self._one(r, given) for r in self.rewards))
        metrics = {f"reward_{r.name}": score.reward for r, score in zip(self.rewards, results)}
        failed = [(r.name, score) for r, score in zip(self.rewards, results) if score.error]
        if failed:
            kind = ScoreKind.INVALID if all(s.kind is ScoreKind.INVALID for _, s in failed) else ScoreKind.ENV_ERROR
            return Score.failed(kind, "; ".join(f"{name}: {s.error}" for name, s in failed), metrics)
        total = sum(r.weight for r in self.rewards)
        return Score(sum(r.weight * score.reward for r, score in zip(self.rewards, results)) / total, metrics)

    async def _one(self, reward: _Reward, given: dict[str, Any]) -> Score:
        kwargs = given if reward.wants is None else {k: v for k, v in given.items() if k in reward.wants}
        try:
            if inspect.iscoroutinefunction(reward.call):
                value = await asyncio.wait_for(reward.call(**kwargs), self.timeout_s)
            else:  # in a thread: a slow function does not stall the other scores (a hung one is abandoned)
                value = await asyncio.wait_for(asyncio.to_thread(reward.call, **kwargs), self.timeout_s)
        except asyncio.TimeoutError:
            return Score.failed(ScoreKind.ENV_ERROR, f"timeout: no reward within {self.timeout_s:g}s")
        except Exception as exc:  # noqa: BLE001 - a user function's bug must not kill the step
            return Score.failed(ScoreKind.ENV_ERROR, f"{type(exc).__name__}: {str(exc)[:200]}")
        if isinstance(value, Score):
            return checked(value)
        if not isinstance(value, (int, float)) or not math.isfinite(value):  # a bool is 1 or 0
            return Score.failed(ScoreKind.ENV_ERROR, f"returned {type(value).__name__} {value!r:.40}, "
                                                     "not a finite number")
        return Score(min(1.0, max(0.0, float(value))))
