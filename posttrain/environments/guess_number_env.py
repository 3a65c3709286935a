"""`guess_number`: a plain multi-turn game without tools, where the environment talks back.

Each sample hides a secret number (seeded). The model answers with a number each turn; the
environment replies as ``user`` with ``higher`` or ``lower``. Reward 1 when it names the secret
within ``max_turns`` guesses, else 0 at the last guess. A reply that is not just a number (bare
or in ``\\boxed{}``) gets a ``user`` message asking for one: a counted error that uses up the
turn. Binary search always wins within ceil(log2(high - low + 2)) guesses: 7 for 1..100.
"""

from __future__ import annotations

import math
import random
import re

from posttrain.environments.base import DefaultHooks, Sample, Score, user_prompt
from posttrain.environments.multiturn import AssistantTurn, Episode, Observation

# The whole answer is the guess: a number, bare or boxed, maybe with a full stop. Anything else is no
# guess, so text that merely contains digits (a garbage answer, a restated range) never wins by luck.
_GUESS = re.compile(r"(?:\\boxed\{\s*(-?\d{1,12})\s*\}|(-?\d{1,12}))\.?")
MAX_GUESS_CHARS = 64


def parse_guess(text: str) -> int | None:
    """The number ``text`` consists of (``42``, ``42.``, ``\\boxed{42}``), or None."""
    text = text.strip()
    match = _GUESS.fullmatch(text) if len(text) <= MAX_GUESS_CHARS else None
    return None if match is None else int(match.group(1) or match.group(2))


def binary_search(secret: int, low: int, high: int) -> list[int]:
    """The guesses of binary search over [low, high] until it names ``secret``."""
    guesses = []
    while low <= high:
        guess = (low + high) // 2
        guesses.append(guess)
        if guess == secret:
            break
        low, high = (guess + 1, high) if secret > guess else (low, guess - 1)
    return guesses


class GuessNumberEnv(DefaultHooks):
    """Multi-turn: find a secret number from "higher"/"lower" replies.

    Options:
        low: smallest secret
        high: largest secret
        max_turns: guesses per episode
        size: train episodes
        test_size: held-out episodes
        system: system prompt added to every episode (None = none)
    """

    name = "guess_number"
    tools: tuple = ()
    eval_metrics = ("guesses", "invalid_guesses")

    def __init__(self, low: int = 1, high: int = 100, max_turns: int = 7, size: int = 500, test_size: int = 100,
                 system: str | None = None) -> None:
        if not (isinstance(low, int) and isinstance(high, int)) or low >= high:
            raise ValueError(f"low and high must be integers with low < high (got {low!r}, {high!r})")
        if not 1 <= max_turns <= 100:
            raise ValueError(f"max_turns must be in 1..100 (got {max_turns})")
        if size < 1 or test_size < 0:
            raise ValueError(f"size must be >= 1 and test_size >= 0 (got {size}, {test_size})")
        self.low, self.high, self.max_turns = low, high, max_turns
        self.size, self.test_size, self.system = size, test_size, system

    def prompt(self) -> str:
        return (f"I am thinking of a whole number from {self.low} to {self.high}. Guess it: answer with one "
                "number each turn (the number only), and I will tell you whether my number is higher or lower "
                f"than your guess. You have {self.max_turns} guesses.")

    def samples(self, split: str, seed: int) -> list[Sample]:
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test' (got {split!r})")
        rng = random.Random(f"guess_number/{split}/{seed}")
        return [Sample(id=f"guess_number/{split}/{seed}/{i}", answer=rng.randint(self.low, self.high),
                       messages=user_prompt(self.prompt(), self.system))
                for i in range(self.size if split == "train" else self.test_size)]

    async def reset(self, sample: Sample) -> Episode:
        return Episode(sample=sample, messages=[dict(m) for m in sample.messages], state={"guesses": 0})

    async def step(self, episode: Episode, turn: AssistantTurn) -> Observation:
        episode.state["guesses"] = used = int(episode.state.get("guesses", 0)) + 1
        secret, guess = int(episode.sample.answer), parse_guess(turn.content)
        metrics = {"guesses": 1.0, "invalid_guesses": float(guess is None)}
        if guess == secret:
            return Observation(done=True, score=Score(1.0), metrics=metrics)
        if used >= self.max_turns:
            return Observation(done=True, score=Score(0.0), metrics=metrics)
        if guess is None:
            reply = f"Please answer with one whole number from {self.low} to {self.high}."
            return Observation([{"role": "user", "content": reply}], metrics=metrics,
                               errors=("no number in the answer",))
        return Observation([{"role": "user", "content": "higher" if secret > guess else "lower"}], metrics=metrics)

    def gold_episode(self, sample: Sample) -> list[str] | None:
        """Binary search for the secret; None when it needs more guesses than ``max_turns``."""
        guesses = binary_search(int(sample.answer), self.low, self.high)
        return [str(g) for g in guesses] if len(guesses) <= self.max_turns else None

    def worst_case_guesses(self) -> int:
        return math.ceil(math.log2(self.high - self.low + 2))
