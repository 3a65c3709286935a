"""Thinking budget: the tracker state machine and its HF generate adapter."""

from __future__ import annotations

import pytest
import torch

from posttrain import chat_template as ct
from posttrain import models
from posttrain.rollout.budget import BudgetSpec, BudgetTracker, HFThinkingBudget


class CharTokenizer:
    """One token per character: makes the budget arithmetic exact and readable."""

    def encode(self, text, add_special_tokens=False):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i) for i in ids)


def run(tracker: BudgetTracker, model_text: str, steps: int) -> str:
    """Drive the tracker as a sampler would; the 'model' wants to emit model_text forever."""
    out, i = [], 0
    for _ in range(steps):
        forced = tracker.forced_token()
        token = forced if forced is not None else ord(model_text[i % len(model_text)])
        if forced is None:
            i += 1
        out.append(token)
        tracker.observe(token)
    return "".join(map(chr, out))


def make(budget: int, grace: float = 0.1) -> BudgetTracker:
    tok = CharTokenizer()
    return BudgetTracker(BudgetSpec.build(tok, budget, grace), tok.decode)


def test_forces_close_at_newline_after_budget():
    text = run(make(10), "abcd\n", 30)  # newline every 5 chars: the 10th token is a newline
    assert text.startswith("abcd\nabcd\n</think>\n")
    assert text[len("abcd\nabcd\n</think>\n"):].startswith("abcd")  # the answer then flows freely


def test_waits_for_newline_within_grace_then_cuts_mid_line():
    tracker = make(20, grace=0.1)  # grace = 2 tokens
    text = run(tracker, "x" * 100, 40)
    assert text.startswith("x" * 22 + "\n</think>\n")
    assert tracker.reasoning_tokens == 22 and tracker.closed


def test_newline_inside_grace_is_used():
    text = run(make(20, grace=0.1), "x" * 20 + "y\n" + "z" * 50, 40)
    assert text.startswith("x" * 20 + "y\n</think>\n")


def test_natural_close_stops_counting():
    tracker = make(100)
    text = run(tracker, "short\n</think>\nanswer" + "!" * 200, 60)
    assert text.count("</think>") == 1 and tracker.closed
    assert tracker.reasoning_tokens == len("short\n</think>")


def test_zero_budget_closes_immediately():
    assert run(make(0), "abc", 12).startswith("</think>\nabc")


def test_negative_budget_rejected():
    with pytest.raises(ValueError, match=">= 0"):
        BudgetSpec.build(CharTokenizer(), -5)


@pytest.mark.parametrize("budget", [0, 8, 24])
def test_hf_generate_respects_budget(tiny_llama_dir, budget):
    tokenizer = models.load_tokenizer("tiny-llama")
    model = models.load_model("tiny-llama")
    messages = [{"role": "user", "content": "count to ten"}]
    prompt = ct.render(tokenizer, messages, add_generation_prompt=True, reasoning_budget=budget)
    ids = tokenizer([prompt, prompt], return_tensors="pt", add_special_tokens=False)
    processor = HFThinkingBudget(tokenizer, budget)
    torch.manual_seed(0)
    out = model.generate(**ids, max_new_tokens=budget + 40, do_sample=True, temperature=1.0,
                         logits_processor=[processor], pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    spec = processor.spec
    for row, tracker in zip(out, processor.trackers):
        text = tokenizer.decode(row[ids["input_ids"].shape[1]:], skip_special_tokens=True)
        part = ct.split_reasoning(text)
        assert part.reasoning_closed, text
        assert part.answer, text  # the answer still follows the forced close
        reasoning_ids = tokenizer.encode(text.split(ct.THINK_CLOSE)[0], add_special_tokens=False)
        assert len(reasoning_ids) <= budget + spec.grace + len(spec.close_mid_line)
        assert tracker.reasoning_tokens <= budget + spec.grace
