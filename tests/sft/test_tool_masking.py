"""SFT on a tool-use trace: the loss covers the assistant's turns (tool calls included), never the
tools block of the system turn or the tool responses."""

from __future__ import annotations

import json
from dataclasses import replace

from posttrain import chat_template as ct
from posttrain import tool_calls as tc
from posttrain.environments.multiturn import ToolCall
from posttrain.sft import data
from posttrain.sft.config import DataConfig

TOOLS = [{"type": "function", "function": {
    "name": "python", "description": "Run Python code and return what it prints.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}}}]
CALL = ToolCall("python", {"code": "print(1234 * 5678)"})
TRACE = [
    {"role": "system", "content": "Use the python tool for arithmetic."},
    {"role": "user", "content": "What is 1234 * 5678?"},
    {"role": "assistant", "content": "Let me compute.", "reasoning_content": "Too big to do in my head.",
     "tool_calls": [{"name": CALL.name, "arguments": CALL.arguments}]},
    {"role": "tool", "content": "7006652"},
    {"role": "assistant", "content": "\\boxed{7006652}", "reasoning_content": "The tool printed 7006652."},
]
ASSISTANT_TEXT = ("<think>\nToo big to do in my head.\n</think>\nLet me compute.\n" + tc.format_call(CALL) + "<|im_end|>"
                  "<think>\nThe tool printed 7006652.\n</think>\n\\boxed{7006652}<|im_end|>")


def _tokenized(tokenizer) -> data.Tokenized:
    assert data.row_errors(0, TRACE) == []
    example = data.make_example(0, TRACE, DataConfig(reasoning_off_share=0.0, budget_cut_share=0.0), tokenizer)
    assert example.mode == "full"
    return data.tokenize(replace(example, template={**example.template, "tools": TOOLS}), tokenizer)


def _assistant_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of each assistant turn's body: after its header, through its <|im_end|>."""
    spans, head = [], "<|im_start|>assistant\n"
    start = text.find(head)
    while start >= 0:
        end = text.index(ct.IM_END, start) + len(ct.IM_END)
        spans.append((start + len(head), end))
        start = text.find(head, end)
    return spans


def test_mask_is_exactly_the_assistant_tokens(tokenizer):
    sample = _tokenized(tokenizer)
    text = ct.render(tokenizer, TRACE, tools=TOOLS)
    assert tokenizer.decode(sample.input_ids, skip_special_tokens=False) == text
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert len(offsets) == len(sample.input_ids)
    spans = _assistant_spans(text)
    expected = [int(any(a <= s < b for a, b in spans)) for s, _ in offsets]
    assert sample.loss_mask == expected


def test_tool_call_trains_and_tool_output_does_not(tokenizer):
    sample = _tokenized(tokenizer)
    on = tokenizer.decode([t for t, m in zip(sample.input_ids, sample.loss_mask) if m], skip_special_tokens=False)
    off = tokenizer.decode([t for t, m in zip(sample.input_ids, sample.loss_mask) if not m], skip_special_tokens=False)
    assert on == ASSISTANT_TEXT
    assert "<tool_response>\n7006652\n</tool_response>" in off and "<tools>" in off and '"description"' in off
    assert "<tool_call>" not in off.split("What is 1234 * 5678?")[1]  # only the system's instruction shows one


def test_build_renders_a_rows_tools(tokenizer, tmp_path):
    """A jsonl row with a ``tools`` column (a list or its JSON text) trains through ``data.build``."""
    final_call = {"role": "assistant", "content": None, "tool_calls": TRACE[2]["tool_calls"]}
    rows = [{"messages": TRACE, "tools": TOOLS}, {"messages": TRACE, "tools": json.dumps(TOOLS)},
            {"messages": TRACE[:3] + [TRACE[3], final_call]}]
    path = tmp_path / "traces.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    built = data.build(DataConfig(path=str(path), reasoning_off_share=0.0, budget_cut_share=0.0), tokenizer, 4096)
    first, second, third = built.samples
    assert first.input_ids == second.input_ids and "<tools>" in tokenizer.decode(first.input_ids)
    assert tokenizer.decode([t for t, m in zip(first.input_ids, first.loss_mask) if m]) == ASSISTANT_TEXT
    assert tokenizer.decode(third.input_ids).count("<tool_call>\n{\"name\": \"python\"") == 2
