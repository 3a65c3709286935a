"""Reasoning-budget transforms, assistant-only masks, row checks."""

from __future__ import annotations

import json

import pytest

from posttrain.sft import data
from posttrain.sft.arith import generate, well_formed
from posttrain.sft.config import DataConfig

ROWS = generate(1000, seed=5)


def test_transform_shares_and_determinism(tokenizer) -> None:
    cfg = DataConfig(reasoning_off_share=0.10, budget_cut_share=0.03)
    modes = [data.make_example(i, r["messages"], cfg, tokenizer).mode for i, r in enumerate(ROWS)]
    assert 0.07 < modes.count("off") / 1000 < 0.13
    assert 0.01 < modes.count("cut") / 1000 < 0.05
    again = [data.make_example(i, r["messages"], cfg, tokenizer).mode for i, r in enumerate(ROWS)]
    assert modes == again  # fixed per row: independent of order, processes, resume


def _first(mode: str, tokenizer, **kw) -> data.Tokenized:
    cfg = DataConfig(**kw)
    for i, r in enumerate(ROWS):
        ex = data.make_example(i, r["messages"], cfg, tokenizer)
        if ex.mode == mode:
            return data.tokenize(ex, tokenizer)
    raise AssertionError(mode)


def _loss_text(sample: data.Tokenized, tokenizer) -> str:
    return tokenizer.decode([t for t, m in zip(sample.input_ids, sample.loss_mask) if m])


def test_off_renders_thinking_off(tokenizer) -> None:
    s = _first("off", tokenizer, reasoning_off_share=0.5)
    text = tokenizer.decode(s.input_ids)
    assert "<think></think>The answer is" in text and "I need" not in text
    assert _loss_text(s, tokenizer).startswith("<think></think>The answer is")


def test_cut_keeps_answer_and_announces_budget(tokenizer) -> None:
    s = _first("cut", tokenizer, budget_cut_share=0.5)
    row = ROWS[s.row]["messages"]
    text = tokenizer.decode(s.input_ids)
    budget = int(text.split("{thinking token budget: ")[1].split("}")[0])
    reasoning = text.split("<think>\n")[1].split("\n</think>")[0]
    full = row[1]["reasoning_content"]
    assert full.startswith(reasoning) and len(reasoning) < len(full)
    assert abs(len(tokenizer.encode(reasoning, add_special_tokens=False)) - budget) <= 1
    assert text.rstrip().endswith(row[1]["content"] + "<|im_end|>")


def test_mask_only_on_assistant(tokenizer) -> None:
    s = _first("full", tokenizer)
    loss = _loss_text(s, tokenizer)
    assert loss.startswith("<think>\nI need") and loss.endswith("<|im_end|>")
    assert "user" not in loss and "<|im_start|>" not in loss
    assert well_formed(loss.removeprefix("<think>\n").removesuffix("<|im_end|>"), thinking=True)


def test_inline_think_content_is_split(tokenizer) -> None:
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>plan</think>Hello!"}]
    ex = data.make_example(0, msgs, DataConfig(reasoning_off_share=0, budget_cut_share=0), tokenizer)
    assert ex.mode == "full" and ex.messages[-1]["reasoning_content"] == "plan"


def test_bad_rows_named_before_training(tmp_path) -> None:
    rows = [ROWS[0], {"messages": [{"role": "user", "content": "no answer"}]},
            {"messages": [{"role": "robot", "content": 3}, {"role": "assistant", "content": "x"}]}]
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = data.load_rows(DataConfig(path=str(path)))
    with pytest.raises(ValueError) as err:
        data.check_rows(loaded)
    msg = str(err.value)
    assert "row 1, field messages: no assistant message" in msg
    assert "row 2, field messages[0].role = 'robot'" in msg
    assert "row 2, field messages[0].content: expected a string, got int" in msg


def test_missing_column_and_file(tmp_path, arith_jsonl) -> None:
    with pytest.raises(ValueError, match="no column 'conversations'"):
        data.load_rows(DataConfig(path=str(arith_jsonl), messages_field="conversations"))
    with pytest.raises(FileNotFoundError, match="not found"):
        data.load_rows(DataConfig(path=str(tmp_path / "nope.jsonl")))


def test_shipped_dataset_loads() -> None:
    assert len(data.load_rows(DataConfig(path="posttrain:arith_reasoning", limit=5))) == 5
    assert len(data.load_rows(DataConfig(path="posttrain:arith_reasoning", split="test"))) == 50


def test_config_checks() -> None:
    with pytest.raises(ValueError, match="budget_fraction"):
        DataConfig(budget_fraction=(0.5, 0.2))
