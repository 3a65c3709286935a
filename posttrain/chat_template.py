"""The reasoning-aware chat template and helpers around it.

ChatML (`<|im_start|>role ... <|im_end|>`) with the reasoning controls of Nemotron 3 Nano:

- ``enable_thinking`` (default on): the generation prompt ends in ``<think>\\n``; off gives
  ``<think></think>`` so the model answers directly.
- ``/think`` and ``/no_think`` in system or user text switch it per conversation (latest wins).
- ``reasoning_budget=N`` appends ``{thinking token budget: N}`` to the last user message
  (the rollout engine also enforces it, see ``posttrain.rollout.budget``).
- ``truncate_history_thinking`` (default on) drops the reasoning of assistant turns before the
  last user message.
- Assistant turns sit inside ``{% generation %}`` markers, so
  ``apply_chat_template(..., return_assistant_tokens_mask=True)`` gives assistant-only masks.
- ``tools`` (OpenAI function schemas) go into the system turn, Hermes/Qwen style; an assistant's
  ``tool_calls`` render inside its generation markers as ``<tool_call>`` blocks (exactly
  :func:`posttrain.tool_calls.format_call`), and consecutive ``tool`` messages render as one user
  turn of ``<tool_response>`` blocks -- as Nemotron 3 Nano's template does. Tool turns are not user
  turns for ``truncate_history_thinking``: reasoning is kept across the turns of one tool episode.
- :func:`continuation` is the text between a generated assistant turn and the next generation
  prompt, so a multi-turn rollout extends its token ids without ever re-rendering the conversation.

``<think>``/``</think>`` are plain text here (several tokens for SmolLM2's tokenizer): no
embedding rows are added to pretrained models, and every tokenizer renders them the same way.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
IM_END = "<|im_end|>"
Messages = list[dict[str, Any]]
Tools = list[dict[str, Any]]
# continuation() renders the observation after this fixed exchange and keeps what follows its end
_ANCHOR: Messages = [{"role": "user", "content": "."}, {"role": "assistant", "content": "."}]
_ANCHOR_END = "<|im_start|>assistant\n<think></think>.<|im_end|>"


@lru_cache(maxsize=1)
def template_text() -> str:
    return resources.files("posttrain").joinpath("templates/chat.jinja").read_text()


def install(tokenizer: Any) -> Any:
    """Give ``tokenizer`` our template (in place; returned for chaining)."""
    tokenizer.chat_template = template_text()
    return tokenizer


def template_kwargs(
    enable_thinking: bool = True,
    reasoning_budget: int | None = None,
    truncate_history_thinking: bool = True,
) -> dict[str, Any]:
    if reasoning_budget is not None and reasoning_budget < 0:
        raise ValueError(f"reasoning_budget must be >= 0 (got {reasoning_budget})")
    kw: dict[str, Any] = {
        "enable_thinking": enable_thinking,
        "truncate_history_thinking": truncate_history_thinking,
    }
    if reasoning_budget is not None:
        kw["reasoning_budget"] = int(reasoning_budget)
    return kw


def render(
    tokenizer: Any,
    messages: Messages,
    *,
    tools: Tools | None = None,
    add_generation_prompt: bool = False,
    **kwargs: Any,
) -> str:
    """Messages (and optional ``tools``) -> prompt text with our template (whatever the tokenizer carries).

    ``kwargs``: ``enable_thinking``, ``reasoning_budget``, ``truncate_history_thinking``.
    """
    return tokenizer.apply_chat_template(
        _prepared(messages),
        tools=_checked_tools(tools),
        chat_template=template_text(),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **template_kwargs(**kwargs),
    )


def encode_with_assistant_mask(
    tokenizer: Any, messages: Messages, *, tools: Tools | None = None, **kwargs: Any
) -> tuple[list[int], list[int]]:
    """Token ids of the conversation and a 0/1 mask that is 1 exactly on assistant tokens.

    The mask covers each assistant turn's content, reasoning, tool calls and closing ``<|im_end|>``
    (so the model learns to call and to stop), never the ``<|im_start|>assistant`` header, the tools
    block of the system turn, tool responses or other roles.
    """
    out = tokenizer.apply_chat_template(
        _prepared(messages),
        tools=_checked_tools(tools),
        chat_template=template_text(),
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        **template_kwargs(**kwargs),
    )
    return list(out["input_ids"]), list(out["assistant_masks"])


def continuation(
    tokenizer: Any,
    observation_messages: Messages,
    *,
    ended_with_eos: bool,
    enable_thinking: bool = True,
    reasoning_budget: int | None = None,
) -> str:
    """The text after a generated assistant turn, up to and including the next generation prompt.

    A multi-turn rollout appends the tokens of this text to prompt + generated ids instead of
    re-rendering the conversation (a re-render can tokenise the model's own text differently).
    ``ended_with_eos``: the generated ids end with ``<|im_end|>`` (the EOS); if not (cut at max
    tokens) the text starts by closing the turn. ``enable_thinking`` is the conversation's state so far (see
    :func:`thinking_enabled`); ``/think`` / ``/no_think`` in user observations still switch it.
    ``reasoning_budget`` is announced in the last user message of the observation, if any (a full
    render would move it there from the earlier user message; tool turns never carry it).
    Equal to the template's own rendering (tests): ``render(conv + obs, add_generation_prompt=True)
    == render(conv[:-1], add_generation_prompt=True) + generated + continuation(obs)`` for tool
    observations, and for user ones with ``truncate_history_thinking=False`` and no budget.
    """
    obs = list(observation_messages) if isinstance(observation_messages, (list, tuple)) else None
    if not obs or any(not isinstance(m, dict) or m.get("role") not in ("tool", "user") for m in obs):
        raise ValueError(f"observation_messages must be a non-empty list of tool/user messages "
                         f"(got {observation_messages!r:.120})")
    text = render(tokenizer, _ANCHOR + obs, add_generation_prompt=True, enable_thinking=enable_thinking,
                  reasoning_budget=reasoning_budget, truncate_history_thinking=False)
    cut = text.index(_ANCHOR_END) + len(_ANCHOR_END)
    return ("" if ended_with_eos else IM_END) + text[cut:]


def continuation_ids(tokenizer: Any, observation_messages: Messages, **kwargs: Any) -> list[int]:
    """Token ids of :func:`continuation` (same kwargs), tokenised on its own: no special tokens
    added. Token-exact with the full render's ids because the text starts at ``<|im_end|>`` or
    right after it, where a tokenizer with ``<|im_end|>`` as a special token splits (tested on
    SmolLM2's, which the tiny test models share)."""
    return list(tokenizer.encode(continuation(tokenizer, observation_messages, **kwargs), add_special_tokens=False))


def thinking_enabled(messages: Messages, default: bool = True) -> bool:
    """What the template decides: the latest ``/think`` or ``/no_think`` wins, else ``default``."""
    state = default
    for m in messages:
        if m.get("role") not in ("system", "user"):
            continue
        text = _text_of(m.get("content"))
        on, off = text.rfind("/think"), text.rfind("/no_think")
        if on != off:
            state = on > off
    return state


@dataclass(frozen=True)
class ReasoningSplit:
    """A completion cut into its reasoning and its answer (see :func:`split_reasoning`)."""

    reasoning: str | None  # None when the completion carries no reasoning part
    answer: str
    reasoning_closed: bool  # False when generation stopped inside <think> (e.g. max tokens)


def answer_offset(text: str) -> int:
    """Where the answer of ``text`` starts: just past the FIRST ``</think>`` (0 when there is none).

    The first close, not the last, because that is where the reasoning ended while the model wrote
    it: the thinking budget stops counting there (``posttrain.rollout.budget``), the answer-length
    counts start there, and vLLM's reasoning parsers cut there too. A model that then writes
    ``</think>`` inside its answer (explaining the tag, quoting a response) keeps its whole answer:
    cutting at the last one would quietly turn the part before it into unscored "reasoning", so a
    verifier or judge would see only a tail of what the user sees. The chat template renders a
    history turn with the same cut.
    """
    close = text.find(THINK_CLOSE)
    return close + len(THINK_CLOSE) if close >= 0 else 0


def reopens_reasoning(answer: str) -> bool:
    """Whether the answer part (after the first ``</think>``) holds a think tag again: malformed output."""
    return THINK_OPEN in answer or THINK_CLOSE in answer


def split_reasoning(text: str, *, started_in_reasoning: bool = True) -> ReasoningSplit:
    """Split a completion into reasoning and answer at the first ``</think>`` (see :func:`answer_offset`).

    ``started_in_reasoning``: the prompt ended in ``<think>\\n`` (thinking on), so the text begins
    inside the reasoning. Works on any string (model output is untrusted): plain ``str`` ops, no
    regex backtracking. An unclosed reasoning part yields an empty answer. The one reasoning split
    of the package: rollouts, chat, SFT data and the GenRM judge's output all go through it.
    """
    if not isinstance(text, str):
        raise TypeError(f"completion must be str, got {type(text).__name__}")
    start = answer_offset(text)
    if start:
        reasoning = text[: start - len(THINK_CLOSE)].split(THINK_OPEN)[-1].strip()
        return ReasoningSplit(reasoning=reasoning, answer=text[start:].strip(), reasoning_closed=True)
    stripped = text.lstrip()
    if started_in_reasoning or stripped.startswith(THINK_OPEN):
        reasoning = stripped[len(THINK_OPEN) :] if stripped.startswith(THINK_OPEN) else text
        return ReasoningSplit(reasoning=reasoning.strip(), answer="", reasoning_closed=False)
    return ReasoningSplit(reasoning=None, answer=text.strip(), reasoning_closed=True)


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def _prepared(messages: Messages) -> Messages:
    """Checked messages with assistant ``tool_calls`` as ``{"name", "arguments"}`` (JSON-string
    arguments decoded), so every accepted call form renders like :func:`tool_calls.format_call`."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] must be a dict with a string 'role' (got {m!r:.80})")
        if "content" not in m and "reasoning_content" not in m and not m.get("tool_calls"):
            raise ValueError(f"messages[{i}] ({m['role']}) has no 'content'")
        if m.get("tool_calls"):
            m = {**m, "tool_calls": [_call_dict(i, j, c) for j, c in enumerate(_listed(i, m["tool_calls"]))]}
        out.append(m)
    return out


def _listed(i: int, calls: Any) -> list[Any]:
    if not isinstance(calls, (list, tuple)):
        raise ValueError(f"messages[{i}].tool_calls must be a list of calls (got {type(calls).__name__})")
    return list(calls)


def _call_dict(i: int, j: int, call: Any) -> dict[str, Any]:
    """One call of any accepted form (``{"name", "arguments"}``, OpenAI ``{"function": {...}}``, a
    ``ToolCall``) as ``{"name", "arguments"}``."""
    if not isinstance(call, dict) and hasattr(call, "name") and hasattr(call, "arguments"):
        call = {"name": call.name, "arguments": call.arguments}
    fn = call.get("function") if isinstance(call, dict) else None
    fn = fn if isinstance(fn, dict) else call
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise ValueError(f"messages[{i}].tool_calls[{j}] needs a string 'name' (got {call!r:.120}); use "
                         "{'name': ..., 'arguments': {...}} or {'type': 'function', 'function': {...}}")
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            decoded = json.loads(args)
        except ValueError:
            decoded = None
        args = decoded if isinstance(decoded, dict) else args  # an undecodable string renders as written
    return {"name": fn["name"], "arguments": {} if args is None else args}


def _checked_tools(tools: Tools | None) -> Tools | None:
    if tools is None:
        return None
    if not isinstance(tools, (list, tuple)):
        raise ValueError(f"tools must be a list of function schemas (got {type(tools).__name__})")
    for k, tool in enumerate(tools):
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise ValueError(f"tools[{k}] must be {{'type': 'function', 'function': {{'name', 'description', "
                             f"'parameters'}}}} or {{'name', ...}} (got {tool!r:.120})")
    return list(tools) or None
