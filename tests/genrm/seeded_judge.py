"""A deterministic GenRM for end-to-end tests: the real ``genrm`` environment and ``LocalJudge``,
over an in-process stand-in for the judge's engines whose verdicts follow the sampling seed and
the conversation (so they change if a resumed run forgets the judge's seed or the shuffle RNG)."""

from __future__ import annotations

import json
import random
from types import SimpleNamespace
from typing import Any

from posttrain.genrm.backends import LocalJudge, judge_generation
from posttrain.genrm.environment import GenRMEnv
from posttrain.genrm.judge import JudgeConfig


class SeededJudgePool:
    def generate(self, prompts: list[Any], gen: Any, n: int) -> list[list[Any]]:
        out = []
        for conv in prompts:
            rng = random.Random(f"{gen.seed}|{conv[-1]['content']}")
            verdict = {"score_1": rng.randint(1, 5), "score_2": rng.randint(1, 5), "ranking": rng.randint(1, 6)}
            out.append([SimpleNamespace(text=json.dumps(verdict), token_ids=[1], finish_reason="stop",
                                        top_tokens=None)])
        return out


def seeded_genrm(**options: Any) -> GenRMEnv:
    """``genrm`` judged by :class:`SeededJudgePool` (options as the built-in's; judge.model is a label)."""
    judge = JudgeConfig.model_validate(options.get("judge", {}))
    return GenRMEnv(LocalJudge(SeededJudgePool(), judge_generation(judge)), **options)
