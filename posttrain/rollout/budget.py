"""Thinking budget: count tokens inside ``<think>`` and force ``</think>`` at the budget.

Backend-independent core (:class:`BudgetTracker`, one per sequence) plus an HF ``generate``
adapter. As in the reference recipe, the cut waits up to ``grace`` (default 10%) extra tokens
for a newline so the reasoning is not broken mid-line, then forces the closing tag token by
token; the answer follows freely.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from posttrain.chat_template import THINK_CLOSE

_WINDOW = 16  # tokens of decoded tail kept to spot a natural </think>


@dataclass(frozen=True)
class BudgetSpec:
    """Token-level facts the trackers need, computed once per tokenizer."""

    budget: int
    close_after_newline: tuple[int, ...]  # ids of "</think>\n"
    close_mid_line: tuple[int, ...]  # ids of "\n</think>\n"
    grace: int

    @classmethod
    def build(cls, tokenizer: Any, budget: int, grace_fraction: float = 0.1) -> BudgetSpec:
        if budget < 0:
            raise ValueError(f"reasoning budget must be >= 0 (got {budget})")
        encode = lambda s: tuple(tokenizer.encode(s, add_special_tokens=False))  # noqa: E731
        return cls(budget=budget, close_after_newline=encode(THINK_CLOSE + "\n"),
                   close_mid_line=encode("\n" + THINK_CLOSE + "\n"),
                   grace=math.ceil(budget * grace_fraction))


@dataclass
class BudgetTracker:
    """State of one sequence that starts inside ``<think>`` (the prompt opened it)."""

    spec: BudgetSpec
    decode: Any  # token ids -> text
    reasoning_tokens: int = 0
    closed: bool = False
    _forcing: list[int] = field(default_factory=list)
    _tail: list[int] = field(default_factory=list)

    def observe(self, token: int) -> None:
        """Feed the token just generated."""
        if self.closed:
            return
        self._tail = (self._tail + [token])[-_WINDOW:]
        if self._forcing:
            self._forcing.pop(0)
            if not self._forcing:
                self.closed = True
            return
        self.reasoning_tokens += 1
        if THINK_CLOSE in self.decode(self._tail):
            self.closed = True

    def replay(self, token_ids: Sequence[int]) -> list[int]:
        """Feed tokens generated earlier (by this state machine, e.g. in an earlier segment of the same
        completion); returns the positions among them that it forced. Afterwards the state is the one
        generation had after them, so a continuation goes on exactly as an uninterrupted run would."""
        forced: list[int] = []
        for position, token in enumerate(token_ids):
            if self.closed:
                break
            if self.forced_token() is not None:  # advances into forcing exactly where generation did
                forced.append(position)
            self.observe(int(token))
        return forced

    def forced_token(self) -> int | None:
        """The token that must come next, or None to let the model choose."""
        if self.closed:
            return None
        if not self._forcing:
            n, spec = self.reasoning_tokens, self.spec
            if n < spec.budget:
                return None
            at_newline = not self._tail or self.decode(self._tail[-1:]).endswith("\n")
            if not at_newline and n < spec.budget + spec.grace:
                return None
            self._forcing = list(spec.close_after_newline if at_newline else spec.close_mid_line)
        return self._forcing[0]


class HFThinkingBudget:
    """``transformers`` logits processor applying one :class:`BudgetTracker` per batch row."""

    def __init__(self, tokenizer: Any, budget: int, grace_fraction: float = 0.1,
                 resumed: Sequence[Sequence[int]] | None = None) -> None:
        """``resumed``: per batch row, the tokens its completion already has (the tail of its prompt,
        a continued completion); the row's tracker starts from the state after them."""
        self.spec = BudgetSpec.build(tokenizer, budget, grace_fraction)
        self._decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
        self.trackers: list[BudgetTracker] = []
        self._prompt_len: int | None = None
        self._resumed = resumed

    def __call__(self, input_ids: Any, scores: Any) -> Any:  # input_ids: [B, T], scores: [B, V]
        if self._prompt_len is None:
            self._prompt_len = input_ids.shape[1]
            self.trackers = [BudgetTracker(self.spec, self._decode) for _ in range(input_ids.shape[0])]
            for tracker, earlier in zip(self.trackers, self._resumed or []):
                tracker.replay(earlier)
        elif input_ids.shape[1] > self._prompt_len:
            for row, tracker in enumerate(self.trackers):
                tracker.observe(int(input_ids[row, -1]))
        for row, tracker in enumerate(self.trackers):
            token = tracker.forced_token()
            if token is not None:
                scores[row].fill_(float("-inf"))
                scores[row, token] = 0.0
        return scores


class IncrementalBudget:
    """One request's budget for engines that hand over the growing output list each step.

    vLLM's per-request logits processors are called as ``fn(output_ids, logits_row)`` with a
    live reference to the request's output tokens; this feeds the new ones to a
    :class:`BudgetTracker` and forces the closing tag when the tracker says so.
    """

    def __init__(self, spec: BudgetSpec, decode: Any, resumed: Sequence[int] = ()) -> None:
        """``resumed``: the tokens this completion already has (a continued request's prompt tail)."""
        self.tracker = BudgetTracker(spec, decode)
        self.tracker.replay(resumed)
        self._seen = 0

    def __call__(self, output_ids: list[int], logits: Any) -> Any:  # logits: [V]
        for token in output_ids[self._seen :]:
            self.tracker.observe(int(token))
        self._seen = len(output_ids)
        token = self.tracker.forced_token()
        if token is not None:
            logits.fill_(float("-inf"))
            logits[token] = 0.0
        return logits


def trained_mask(length: int, forced: Sequence[int]) -> list[int]:
    """Loss mask of ``length`` generated tokens: 0 at the budget's ``forced`` positions, 1 elsewhere."""
    cut = set(forced)
    return [0 if k in cut else 1 for k in range(length)]


def replay_budget(spec: BudgetSpec, decode: Any, token_ids: list[int]) -> tuple[int, list[int]]:
    """(reasoning tokens, positions of the tokens the budget forced) of a completion that began inside
    ``<think>``: the generator's state machine replayed over its output. Forced tokens are the closing
    tag the engine wrote for the policy; their behaviour logprob is not the policy's (vLLM returns the
    processed one, about 0), so they must not train."""
    tracker = BudgetTracker(spec, decode)
    forced = tracker.replay(token_ids)
    return tracker.reasoning_tokens, forced
