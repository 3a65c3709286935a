"""The reasoning-aware chat template: flags, history truncation, budget text, assistant masks."""

from __future__ import annotations

import pytest

from posttrain import chat_template as ct

USER = {"role": "user", "content": "What is 2+2?"}


def gen_prompt(tokenizer, messages, **kw):
    return ct.render(tokenizer, messages, add_generation_prompt=True, **kw)


def test_generation_prompt_thinking_on_by_default(tokenizer):
    text = gen_prompt(tokenizer, [USER])
    assert text == "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n"


def test_generation_prompt_thinking_off(tokenizer):
    text = gen_prompt(tokenizer, [USER], enable_thinking=False)
    assert text.endswith("<|im_start|>assistant\n<think></think>")
    assert "<think>\n" not in text


@pytest.mark.parametrize(
    ("messages", "default", "expected"),
    [
        ([{"role": "system", "content": "Be brief. /no_think"}, USER], True, False),
        ([{"role": "system", "content": "/no_think"}, {"role": "user", "content": "hi /think"}], True, True),
        ([{"role": "system", "content": "/think"}, USER], False, True),
        ([{"role": "user", "content": "/think then /no_think"}], True, False),
        ([{"role": "user", "content": "/no_think"}, {"role": "assistant", "content": "ok"},
          {"role": "user", "content": "again"}], True, False),  # sticky until switched back
        ([{"role": "assistant", "content": "/no_think"}, USER], True, True),  # only system/user count
        ([USER], False, False),
    ],
)
def test_soft_switches_match_python_mirror(tokenizer, messages, default, expected):
    text = gen_prompt(tokenizer, messages, enable_thinking=default)
    assert text.endswith("<think>\n") is expected
    assert text.endswith("<think></think>") is (not expected)
    assert ct.thinking_enabled(messages, default) is expected


def test_budget_goes_to_last_user_message_only(tokenizer):
    messages = [{"role": "user", "content": "first"}, {"role": "assistant", "content": "a"},
                {"role": "user", "content": "second"}]
    text = gen_prompt(tokenizer, messages, reasoning_budget=64)
    assert text.count("{thinking token budget: 64}") == 1
    assert "second\n\n{thinking token budget: 64}<|im_end|>" in text
    assert "first<|im_end|>" in text
    assert "budget" not in gen_prompt(tokenizer, messages)


def test_negative_budget_rejected(tokenizer):
    with pytest.raises(ValueError, match="reasoning_budget must be >= 0"):
        gen_prompt(tokenizer, [USER], reasoning_budget=-1)


def conversation():
    return [
        {"role": "user", "content": "q1"},
        {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "<think>\nr2\n</think>\na2"},
    ]


def test_history_thinking_truncated_by_default(tokenizer):
    text = ct.render(tokenizer, conversation())
    assert "r1" not in text
    assert "<|im_start|>assistant\n<think></think>a1<|im_end|>" in text
    assert "<|im_start|>assistant\n<think>\nr2\n</think>\na2<|im_end|>" in text  # after last user: kept


def test_history_thinking_kept_when_asked(tokenizer):
    text = ct.render(tokenizer, conversation(), truncate_history_thinking=False)
    assert "<|im_start|>assistant\n<think>\nr1\n</think>\na1<|im_end|>" in text


def test_assistant_without_reasoning_renders_empty_think(tokenizer):
    text = ct.render(tokenizer, [USER, {"role": "assistant", "content": "4"}])
    assert text.endswith("<|im_start|>assistant\n<think></think>4<|im_end|>\n")


def test_content_parts_and_system(tokenizer):
    messages = [{"role": "system", "content": "sys"},
                {"role": "user", "content": [{"type": "text", "text": "part1 "}, {"type": "text", "text": "part2"}]}]
    text = gen_prompt(tokenizer, messages)
    assert text.startswith("<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\npart1 part2<|im_end|>")


def test_training_render_extends_generation_prompt(tokenizer):
    """What the model is trained on continues exactly what it is prompted with."""
    for think, reply in ((True, {"role": "assistant", "content": "4", "reasoning_content": "2+2=4"}),
                         (False, {"role": "assistant", "content": "4"})):
        prompt = gen_prompt(tokenizer, [USER], enable_thinking=think)
        full = ct.render(tokenizer, [USER, reply], enable_thinking=think)
        assert full.startswith(prompt), (prompt, full)


def test_assistant_mask_covers_exactly_assistant_tokens(tokenizer):
    messages = [{"role": "system", "content": "sys"}] + conversation()
    ids, mask = ct.encode_with_assistant_mask(tokenizer, messages)
    assert len(ids) == len(mask) and set(mask) <= {0, 1}
    masked = tokenizer.decode([t for t, m in zip(ids, mask) if m], skip_special_tokens=False)
    assert masked == "<think></think>a1<|im_end|><think>\nr2\n</think>\na2<|im_end|>"
    unmasked = tokenizer.decode([t for t, m in zip(ids, mask) if not m], skip_special_tokens=False)
    assert "assistant\n" in unmasked and "q1" in unmasked and "sys" in unmasked
    assert "a1" not in unmasked and "a2" not in unmasked
    assert tokenizer.decode(ids, skip_special_tokens=False) == ct.render(tokenizer, messages)


def test_template_is_plain_jinja(plain_jinja):
    """vLLM and other servers render it with their own jinja2 environment."""
    env = plain_jinja
    text = env.from_string(ct.template_text()).render(messages=[USER], add_generation_prompt=True)
    assert text.endswith("<think>\n")


@pytest.mark.parametrize("bad", [[], [{"content": "x"}], [{"role": "user"}], "hi"])
def test_bad_messages_rejected(tokenizer, bad):
    with pytest.raises(ValueError, match="messages"):
        ct.render(tokenizer, bad)


@pytest.mark.parametrize(
    ("text", "started", "reasoning", "answer", "closed"),
    [
        ("r\n</think>\nanswer", True, "r", "answer", True),
        ("<think>\nr\n</think>\nanswer", False, "r", "answer", True),
        ("still thinking", True, "still thinking", "", False),
        ("just an answer", False, None, "just an answer", True),
        ("<think>unclosed", False, "unclosed", "", False),
        ("a</think>b</think>c", True, "a", "b</think>c", True),
        ("", True, "", "", False),
    ],
)
def test_split_reasoning(text, started, reasoning, answer, closed):
    c = ct.split_reasoning(text, started_in_reasoning=started)
    assert (c.reasoning, c.answer, c.reasoning_closed) == (reasoning, answer, closed)


def test_split_reasoning_hostile_inputs_are_fast():
    big = "<think>" * 200_000 + "x" + "</think>" * 200_000
    c = ct.split_reasoning(big)
    assert c.reasoning_closed and c.reasoning == "x"
    with pytest.raises(TypeError):
        ct.split_reasoning(None)  # type: ignore[arg-type]


STRAY_CLOSE = [  # the model wrote </think> inside its answer (explaining the tag, quoting itself)
    "<think>\nr\n</think>\nUse the </think> tag to end reasoning.",
    "r</think>a</think>b",
]


@pytest.mark.parametrize("content", STRAY_CLOSE)
def test_the_template_and_split_reasoning_cut_at_the_same_close(tokenizer, content):
    """The reasoning ends at the FIRST ``</think>``: what follows is the answer, all of it -- as the
    budget processor counts it and as the template renders the turn on the next request."""
    split = ct.split_reasoning(content, started_in_reasoning=False)
    text = ct.render(tokenizer, [USER, {"role": "assistant", "content": content}])
    turn = text.split("<|im_start|>assistant\n")[-1].removesuffix("<|im_end|>\n")
    assert turn == f"<think>\n{split.reasoning}\n</think>\n{split.answer}"
    assert ct.split_reasoning(turn, started_in_reasoning=False) == split
