"""The shipped tool-use traces (``posttrain:tool_traces``): regenerated exactly, true tool outputs, problems
held out from the environment's test split, tool turns masked from the loss, calls that parse back, and
episodes the ``python_tool`` environment itself plays to reward 1."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re

from posttrain import chat_template as ct
from posttrain import tool_calls as tc
from posttrain.environments.multiturn import ToolCall
from posttrain.environments.python_tool_env import PythonToolEnv
from posttrain.sft import data, tool_traces
from posttrain.sft.config import DataConfig

SHIPPED = data.shipped_dataset("tool_traces")
ROWS = {split: [json.loads(line) for line in (SHIPPED / f"{split}.jsonl").read_text().splitlines()]
        for split in ("train", "test")}
ALL = ROWS["train"] + ROWS["test"]


def _printed(code: str) -> str:
    """What the trace's code prints (our own generated code: integers, * + -, print)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<trace>", "exec"), {"__builtins__": {"print": print}})
    return out.getvalue()


def test_generator_is_deterministic_and_reproduces_the_shipped_files(tmp_path) -> None:
    assert tool_traces.generate(40, seed=3) == tool_traces.generate(40, seed=3)
    assert tool_traces.generate(40, seed=3) != tool_traces.generate(40, seed=4)
    assert tool_traces.main([str(tmp_path)]) == 0
    for split in ("train", "test"):
        assert (tmp_path / f"{split}.jsonl").read_bytes() == (SHIPPED / f"{split}.jsonl").read_bytes(), split
    assert (len(ROWS["train"]), len(ROWS["test"])) == (tool_traces.TRAIN_SIZE, tool_traces.TEST_SIZE)


def test_every_tool_output_is_the_true_value() -> None:
    kinds = set()
    for row in ALL:
        system, user, call, tool, final = row["messages"]
        numbers = [int(n) for n in re.findall(r"\d+", row["expression"])]
        assert [int(n) for n in re.findall(r"\d+", user["content"])] == numbers  # the problem's own numbers
        a, b = numbers[:2]
        truth = a * b + (0 if len(numbers) == 2 else numbers[2] * (1 if " + " in row["expression"] else -1))
        code = call["tool_calls"][0]["arguments"]["code"]
        assert tool["content"] == f"{truth}\n" == _printed(code), row
        assert row["answer"] == str(truth) and f"\\boxed{{{truth}}}" in final["content"]
        kinds.add(code.split("\n")[0].split("(")[0].replace(" ", "")[:6])
    assert len(kinds) >= 3  # a little variety in the code, not one string


def test_format_is_the_environments(tokenizer) -> None:
    env = PythonToolEnv(size=1, test_size=1)
    try:
        prompt = env.samples("test", 0)[0].messages
        assert all(row["tools"] == env.tools for row in ALL)
        assert all(row["messages"][0] == prompt[0] for row in ALL)  # the env's system prompt, verbatim
    finally:
        env.close()
    shares = sum(r["thinking"] for r in ALL) / len(ALL)
    assert 0.15 < shares < 0.35  # both generation prompts are covered
    assert all(data.row_errors(i, r["messages"]) == [] for i, r in enumerate(ALL))


def test_problems_are_held_out_from_the_environment_test_split() -> None:
    train = {r["expression"] for r in ROWS["train"]}
    test = {r["expression"] for r in ROWS["test"]}
    assert len(train) == len(ROWS["train"]) and len(test) == len(ROWS["test"]) and not train & test
    for options in ({}, {"digits": [4, 4], "word_problems": 0.0}):
        env = PythonToolEnv(test_size=500, **options)
        try:
            held_out = {s.info["expression"] for s in env.samples("test", 0)}
        finally:
            env.close()
        assert not held_out & (train | test)
    assert tool_traces.generate(20, seed=0, exclude={r["expression"] for r in ROWS["train"][:10]})[0] != ROWS["train"][0]


def _generated_turns(row: dict, tokenizer) -> list[str]:
    """Each assistant turn's text as the model generates it: after the generation prompt (which opens
    ``<think>\\n`` or holds ``<think></think>``), through the text before ``<|im_end|>``."""
    text = ct.render(tokenizer, row["messages"], tools=row["tools"])
    prompt_end = "<think>\n" if row["thinking"] else "<think></think>"
    turns = text.split("<|im_start|>assistant\n")[1:]
    assert all(t.startswith(prompt_end) for t in turns)
    return [t[len(prompt_end):].split(ct.IM_END)[0] for t in turns]


def test_assistant_turns_parse_back_to_the_calls_written(tokenizer) -> None:
    for row in ALL[:150]:
        call_turn, final_turn = _generated_turns(row, tokenizer)
        written = row["messages"][2]
        parsed = tc.assistant_turn(call_turn, thinking=row["thinking"], finish_reason="stop")
        assert parsed.tool_calls == (ToolCall("python", written["tool_calls"][0]["arguments"]),) and not parsed.tool_call_errors
        assert parsed.content == written["content"] and parsed.reasoning == (written.get("reasoning_content") or None)
        done = tc.assistant_turn(final_turn, thinking=row["thinking"], finish_reason="stop")
        assert done.tool_calls == () and done.tool_call_errors == () and done.content == row["messages"][4]["content"]


def test_sft_data_trains_the_calls_and_never_the_tool_output(tokenizer) -> None:
    """Through the SFT data path: the row's tools are rendered, the loss covers exactly the two
    assistant turns (call and answer), never the tools block or the tool's output."""
    cfg = DataConfig(path="posttrain:tool_traces", limit=12, reasoning_off_share=0.0, budget_cut_share=0.0)
    dataset = data.build(cfg, tokenizer, max_tokens=4096)
    assert len(dataset.samples) == 12
    for sample in dataset.samples:
        row = ROWS["train"][sample.row]
        text = tokenizer.decode(sample.input_ids, skip_special_tokens=False)
        assert text == ct.render(tokenizer, row["messages"], tools=row["tools"])
        on = tokenizer.decode([t for t, m in zip(sample.input_ids, sample.loss_mask) if m], skip_special_tokens=False)
        off = tokenizer.decode([t for t, m in zip(sample.input_ids, sample.loss_mask) if not m],
                               skip_special_tokens=False)
        prompt_end = "<think>\n" if row["thinking"] else "<think></think>"
        assert on == "".join(prompt_end + t + ct.IM_END for t in _generated_turns(row, tokenizer))
        assert on.count("<tool_call>") == 1 and "<tool_response>" not in on and "<tools>" not in on
        assert f"<tool_response>\n{row['answer']}\n\n</tool_response>" in off and "<tools>" in off


def test_the_environment_plays_the_traces_to_reward_1(tokenizer) -> None:
    """The final turns score 1 with the environment's own checker (its math verifier on \\boxed{})."""
    env = PythonToolEnv(size=1, test_size=1)

    async def final_score(row: dict) -> float:
        sample = type(env.samples("test", 0)[0])(id="t", messages=row["messages"][:2], answer=row["answer"])
        episode = await env.reset(sample)
        final = _generated_turns(row, tokenizer)[1]
        obs = await env.step(episode, tc.assistant_turn(final, thinking=row["thinking"], finish_reason="stop"))
        assert obs.done
        return obs.score.reward

    try:
        rows = [r for r in ALL if r["thinking"]][:3] + [r for r in ALL if not r["thinking"]][:3]
        assert [asyncio.run(final_score(r)) for r in rows] == [1.0] * 6
    finally:
        env.close()


def test_the_sandboxed_tool_prints_what_the_traces_say(tokenizer) -> None:
    """Replays a few traces' calls through the environment's real tool (sandboxed, ~0.2 s a call): the
    output the traces were written with (computed, never run) is exactly what the model will see."""
    env = PythonToolEnv(size=1, test_size=1)

    async def tool_text(row: dict) -> str:
        call_turn = _generated_turns(row, tokenizer)[0]
        sample = type(env.samples("test", 0)[0])(id="t", messages=row["messages"][:2], answer=row["answer"])
        obs = await env.step(await env.reset(sample), tc.assistant_turn(call_turn, thinking=row["thinking"],
                                                                         finish_reason="stop"))
        assert not obs.done and not obs.errors, obs
        return obs.messages[0]["content"]

    try:
        for row in ALL[:4]:
            assert asyncio.run(tool_text(row)) == row["messages"][3]["content"]
    finally:
        env.close()
