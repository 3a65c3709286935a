"""Tools in the chat template: the system tools block, tool calls, tool responses, and
``continuation`` -- the text a multi-turn rollout appends instead of re-rendering."""

from __future__ import annotations

import pytest

from posttrain import chat_template as ct
from posttrain import tool_calls as tc
from posttrain.environments.multiturn import ToolCall

PYTHON = {"type": "function", "function": {
    "name": "python", "description": "Run Python code and return what it prints.",
    "parameters": {"type": "object", "properties": {"code": {"type": "string"}}, "required": ["code"]}}}
TOOLS = [PYTHON]
SYSTEM = {"role": "system", "content": "Use the tools."}
USER = {"role": "user", "content": "What is 1234 * 5678?"}
CALL = tc.format_call(ToolCall("python", {"code": "print(1234 * 5678)"}))
CALL2 = tc.format_call(ToolCall("python", {"code": "print(sum(range(10)))"}))
END = ct.IM_END


def tool(content: str) -> dict:
    return {"role": "tool", "content": content}


def test_tools_block_in_the_system_turn(tokenizer):
    text = ct.render(tokenizer, [SYSTEM, USER], tools=TOOLS)
    assert text.startswith("<|im_start|>system\nUse the tools.\n\n# Tools\n\n")
    assert "<tools>\n" + '{"type": "function", "function": {"name": "python", ' in text
    assert ('<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
            "<|im_start|>user\nWhat is 1234 * 5678?<|im_end|>\n") in text
    assert text.count("<|im_start|>system") == 1
    bare = ct.render(tokenizer, [SYSTEM, USER], tools=[PYTHON["function"]])
    assert bare == text  # a bare {name, description, parameters} renders as the OpenAI form
    created = ct.render(tokenizer, [USER], tools=TOOLS)
    assert created.startswith("<|im_start|>system\n# Tools\n\n") and created.endswith(text.split("\n\n", 1)[1])


def test_no_tools_renders_as_before(tokenizer):
    for tools in (None, []):
        assert ct.render(tokenizer, [SYSTEM, USER], tools=tools) == (
            "<|im_start|>system\nUse the tools.<|im_end|>\n<|im_start|>user\nWhat is 1234 * 5678?<|im_end|>\n")


@pytest.mark.parametrize("bad", ["python", [{"description": "no name"}], [3]])
def test_bad_tools_rejected(tokenizer, bad):
    with pytest.raises(ValueError, match="tools"):
        ct.render(tokenizer, [USER], tools=bad)


ARGS = {"code": "print(1234 * 5678)"}


@pytest.mark.parametrize("call", [
    {"name": "python", "arguments": ARGS},
    {"type": "function", "function": {"name": "python", "arguments": ARGS}},
    {"type": "function", "function": {"name": "python", "arguments": '{"code":"print(1234 * 5678)"}'}},
    ToolCall("python", ARGS),
])
def test_every_call_form_renders_as_format_call(tokenizer, call):
    msg = {"role": "assistant", "content": "Let me compute.", "tool_calls": [call]}
    text = ct.render(tokenizer, [USER, msg])
    assert text.endswith(f"<|im_start|>assistant\n<think></think>Let me compute.\n{CALL}<|im_end|>\n")


def test_calls_without_content_and_several_calls(tokenizer):
    two = [{"name": "python", "arguments": ARGS}, {"name": "python", "arguments": {"code": "print(sum(range(10)))"}}]
    text = ct.render(tokenizer, [USER, {"role": "assistant", "content": None, "tool_calls": two}])
    assert text.endswith(f"<|im_start|>assistant\n<think></think>{CALL}\n{CALL2}<|im_end|>\n")
    with pytest.raises(ValueError, match=r"tool_calls\[0\] needs a string 'name'"):
        ct.render(tokenizer, [USER, {"role": "assistant", "content": "", "tool_calls": [{"arguments": {}}]}])


def test_consecutive_tool_messages_are_one_user_turn(tokenizer):
    msgs = [USER, {"role": "assistant", "content": "", "tool_calls": [{"name": "python", "arguments": ARGS}] * 2},
            tool("7006652"), tool("45"), {"role": "assistant", "content": "7006652"}]
    text = ct.render(tokenizer, msgs)
    assert ("<|im_end|>\n<|im_start|>user\n<tool_response>\n7006652\n</tool_response>\n"
            "<tool_response>\n45\n</tool_response><|im_end|>\n<|im_start|>assistant\n") in text


def test_reasoning_kept_across_a_tool_episode(tokenizer):
    first = {"role": "assistant", "content": "", "reasoning_content": "use python", "tool_calls": [
        {"name": "python", "arguments": ARGS}]}
    last = {"role": "assistant", "content": "7006652", "reasoning_content": "it printed it"}
    text = ct.render(tokenizer, [USER, first, tool("7006652"), last])
    assert "<think>\nuse python\n</think>\n<tool_call>" in text and "it printed it" in text
    replied = ct.render(tokenizer, [USER, first, {"role": "user", "content": "7006652"}, last])
    assert "use python" not in replied  # a user turn still truncates the history's reasoning


def test_budget_stays_on_the_user_message(tokenizer):
    msgs = [USER, {"role": "assistant", "content": "", "tool_calls": [{"name": "python", "arguments": ARGS}]},
            tool("7006652")]
    text = ct.render(tokenizer, msgs, add_generation_prompt=True, reasoning_budget=32)
    assert "1234 * 5678?\n\n{thinking token budget: 32}<|im_end|>" in text
    assert text.count("thinking token budget") == 1


def test_template_with_tools_is_plain_jinja(plain_jinja):
    """vLLM and other servers render it with their own jinja2 environment (loop.previtem and friends)."""
    env = plain_jinja
    msgs = [USER, {"role": "assistant", "content": "", "tool_calls": [{"name": "python", "arguments": ARGS}]},
            tool("1"), tool("2")]
    text = env.from_string(ct.template_text()).render(messages=msgs, tools=TOOLS, add_generation_prompt=True)
    assert "<tools>\n{" in text and "\n</tool_response>\n<tool_response>\n2\n" in text
    assert text.endswith("<|im_start|>assistant\n<think>\n")


# --------------------------------------------------------------------------- continuation

# (thinking, generated turns as the model writes them after each generation prompt, observations)
EPISODES = {
    "one call, one response": (
        True, [f"I should run it.\n</think>\nLet me compute.\n{CALL}{END}", f"It printed it.\n</think>\n7006652{END}"],
        [[tool("7006652")]]),
    "two calls, two responses": (
        True, [f"Two things.\n</think>\n{CALL}\n{CALL2}{END}", f"Done.\n</think>\n7006652 and 45{END}"],
        [[tool("7006652"), tool("45")]]),
    "calls over three turns": (
        True, [f"a\n</think>\n{CALL}{END}", f"b\n</think>\nNow the sum.\n{CALL2}{END}", f"c\n</think>\nok{END}"],
        [[tool("7006652")], [tool("45")]]),
    "thinking off": (
        False, [f"Let me compute.\n{CALL}{END}", f"7006652{END}"], [[tool("7006652")]]),
    "turn cut before im_end": (
        True, [f"I should run it.\n</think>\n{CALL}", f"ok\n</think>\n7006652{END}"], [[tool("7006652")]]),
}


def _play(tokenizer, think: bool, turns: list[str], observations: list[list[dict]], **kw):
    """Build the prompt turn by turn as a token-exact rollout does (prompt + generated + continuation)
    and check each step against the template's full render; returns the (head, continuation) pairs."""
    history = [SYSTEM, USER]
    text = ct.render(tokenizer, history, tools=TOOLS, add_generation_prompt=True, enable_thinking=think, **kw)
    joins = []
    for generated, obs in zip(turns, observations):
        turn = tc.assistant_turn(generated.removesuffix(END), thinking=think, finish_reason="stop")
        history += [tc.assistant_message(turn), *obs]
        cont = ct.continuation(tokenizer, obs, ended_with_eos=generated.endswith(END),
                               enable_thinking=ct.thinking_enabled(history[:-len(obs)], think),
                               reasoning_budget=kw.get("reasoning_budget"))
        joins.append((text + generated, cont))
        text = text + generated + cont
        full = ct.render(tokenizer, history, tools=TOOLS, add_generation_prompt=True, enable_thinking=think, **kw)
        assert text == full
    return joins


@pytest.mark.parametrize("name", list(EPISODES))
@pytest.mark.parametrize("budget", [None, 64])
def test_continuation_extends_the_render(tokenizer, name, budget):
    think, turns, observations = EPISODES[name]
    _play(tokenizer, think, turns, observations, reasoning_budget=budget)


def test_continuation_of_a_user_reply(tokenizer):
    """An environment that replies as the user (a game): exact when the history keeps its reasoning."""
    turns = [f"Start in the middle.\n</think>\n50{END}", f"Go up.\n</think>\n75{END}", f"Got it.\n</think>\n62{END}"]
    obs = [[{"role": "user", "content": "higher"}], [{"role": "user", "content": "lower /no_think"}]]
    joins = _play(tokenizer, True, turns[:2], obs, truncate_history_thinking=False)
    assert joins[1][1].endswith("<|im_start|>assistant\n<think></think>")  # /no_think in the reply switched it
    with pytest.raises(AssertionError):  # with history truncation the earlier reasoning is dropped: not a prefix
        _play(tokenizer, True, turns[:2], obs)


def test_continuation_text(tokenizer):
    assert ct.continuation(tokenizer, [tool("1"), tool("2")], ended_with_eos=True) == (
        "\n<|im_start|>user\n<tool_response>\n1\n</tool_response>\n<tool_response>\n2\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n<think>\n")
    cut = ct.continuation(tokenizer, [{"role": "user", "content": "higher"}], ended_with_eos=False,
                          enable_thinking=False, reasoning_budget=8)
    assert cut == ("<|im_end|>\n<|im_start|>user\nhigher\n\n{thinking token budget: 8}<|im_end|>\n"
                   "<|im_start|>assistant\n<think></think>")


@pytest.mark.parametrize("bad", [[], [{"role": "assistant", "content": "x"}], [{"role": "system", "content": "x"}],
                                 "text", None])
def test_continuation_rejects_what_is_not_an_observation(tokenizer, bad):
    with pytest.raises(ValueError, match="observation_messages"):
        ct.continuation(tokenizer, bad, ended_with_eos=True)


@pytest.mark.parametrize("name", list(EPISODES))
def test_continuation_tokens_are_exact(tokenizer, name):
    """The continuation tokenised on its own equals the matching slice of the whole text's tokens."""
    think, turns, observations = EPISODES[name]
    for (head, cont), obs in zip(_play(tokenizer, think, turns, observations), observations):
        head_ids = tokenizer.encode(head, add_special_tokens=False)
        whole = tokenizer.encode(head + cont, add_special_tokens=False)
        ids = ct.continuation_ids(tokenizer, obs, ended_with_eos=head.endswith(END), enable_thinking=think)
        assert whole[:len(head_ids)] == head_ids and whole[len(head_ids):] == ids
        assert tokenizer.decode(ids, skip_special_tokens=False) == cont
