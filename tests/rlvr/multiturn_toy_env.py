"""Scripted multi-turn environments for the episode and loop tests (no model skill needed)."""

from __future__ import annotations

import asyncio

from posttrain.environments.base import DefaultHooks, Sample, Score
from posttrain.environments.multiturn import AssistantTurn, Episode, Observation
from posttrain.rollout.types import GeneratedTokens, TokenRequest

COUNT_TOOL = {"type": "function", "function": {
    "name": "count", "description": "Count one up.", "parameters": {"type": "object", "properties": {}}}}


def vowel_share(text: str) -> float:
    letters = [c for c in text.lower() if c.isalpha()]
    return sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0


class CounterEnv(DefaultHooks):
    """A counter game: each turn the environment answers ``count=k`` (as a ``tool`` message, or a
    ``user`` one with ``role="user"``); after ``turns`` assistant turns the episode ends with a reward
    that depends on what the model said (the vowel share of its turns), so a random model's groups
    have variance."""

    name = "counter"
    tools = [COUNT_TOOL]
    max_turns = 8

    def __init__(self, turns: int = 3, size: int = 8, role: str = "tool") -> None:
        self.turns, self.size, self.role = turns, size, role

    def samples(self, split: str, seed: int) -> list[Sample]:
        return [Sample(f"{split}/{i}", [{"role": "user", "content": f"Count with me, game {i}."}])
                for i in range(self.size)]

    async def reset(self, sample: Sample) -> Episode:
        return Episode(sample, list(sample.messages), state={"said": []})

    async def step(self, episode: Episode, turn: AssistantTurn) -> Observation:
        episode.state["said"].append(turn.text)
        if episode.turn >= self.turns:
            return Observation(done=True, score=Score(vowel_share(" ".join(episode.state["said"]))),
                               metrics={"steps": 1.0})
        return Observation([{"role": self.role, "content": f"count={episode.turn}"}], metrics={"steps": 1.0})


class HostileEnv(CounterEnv):
    """Misbehaves by sample: ``raise``, ``hang``, ``junk`` (not an Observation), ``flood`` (too many
    characters), ``long`` (too many tokens for the episode), ``bad_reset``; ``ok`` plays fair."""

    name = "hostile"
    KINDS = ("ok", "raise", "hang", "junk", "flood", "long", "bad_reset", "ok")

    def samples(self, split: str, seed: int) -> list[Sample]:
        return [Sample(f"{split}/{i}-{kind}", [{"role": "user", "content": f"Play {kind}."}], answer=kind)
                for i, kind in enumerate(self.KINDS)]

    async def reset(self, sample: Sample) -> Episode:
        if sample.answer == "bad_reset":
            raise RuntimeError("reset exploded")
        return await super().reset(sample)

    async def step(self, episode: Episode, turn: AssistantTurn) -> Observation:
        kind = episode.sample.answer
        if kind == "raise" and episode.turn == 2:
            raise KeyError("tool crashed")
        if kind == "hang" and episode.turn == 2:
            await asyncio.sleep(3600)
        if kind == "junk" and episode.turn == 2:
            return 42  # type: ignore[return-value]
        if kind == "flood":
            return Observation([{"role": "tool", "content": "x" * 100_000}])
        if kind == "long":
            return Observation([{"role": "tool", "content": "word " * 6000}])
        return await super().step(episode, turn)


class ScriptedEngine:
    """A batch engine whose completion depends only on the request's seed index (as vLLM's seeded
    requests do): words, sometimes a tool call or a malformed one. It records every request, and ends
    turns with ``<|im_end|>`` or (``close_turns=False``) leaves them cut as at max_new_tokens."""

    def __init__(self, tokenizer, close_turns: bool = True) -> None:
        self.tokenizer, self.close_turns = tokenizer, close_turns
        self.requests: list[TokenRequest] = []
        self.end = tokenizer.convert_tokens_to_ids("<|im_end|>")

    async def __call__(self, requests: list[TokenRequest]) -> list[GeneratedTokens]:
        await asyncio.sleep(0)
        self.requests += requests
        return [self.complete(r) for r in requests]

    def complete(self, r: TokenRequest) -> GeneratedTokens:
        words = ["alpha", "beta", "gamma", "delta", "tool"]
        text = " ".join(words[(r.index // (k + 1)) % len(words)] for k in range(3 + r.index % 4))
        if r.index % 3 == 0:
            text = '<tool_call>{"name":"count","arguments":{}}</tool_call>'
        elif r.index % 5 == 1:
            text += "\n<tool_call>{not json</tool_call>"
        ids = self.tokenizer.encode(text, add_special_tokens=False) + ([self.end] if self.close_turns else [])
        cut = ids[: r.max_tokens]
        finish = "stop" if self.close_turns and len(cut) == len(ids) else "length"
        return GeneratedTokens(cut, [-0.25 - 0.01 * i for i in range(len(cut))], finish)
