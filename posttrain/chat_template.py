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

``<think>``/``</think>`` are plain text here (several tokens for SmolLM2's tokenizer): no
embedding rows are added to pretrained models, and every tokenizer renders them the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from typing import Any

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
Messages = list[dict[str, Any]]


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


def render(tokenizer: Any, messages: Messages, *, add_generation_prompt: bool = False, **kwargs: Any) -> str:
    """Messages -> prompt text with our template (whatever template the tokenizer carries)."""
    _check_messages(messages)
    return tokenizer.apply_chat_template(
        messages,
        chat_template=template_text(),
        tokenize=False,
        add_generation_prompt=add_generation_prompt,
        **template_kwargs(**kwargs),
    )


def encode_with_assistant_mask(tokenizer: Any, messages: Messages, **kwargs: Any) -> tuple[list[int], list[int]]:
    """Token ids of the conversation and a 0/1 mask that is 1 exactly on assistant tokens.

    The mask covers each assistant turn's content, reasoning and closing ``<|im_end|>`` (so the
    model learns to stop), never the ``<|im_start|>assistant`` header or other roles.
    """
    _check_messages(messages)
    out = tokenizer.apply_chat_template(
        messages,
        chat_template=template_text(),
        tokenize=True,
        return_dict=True,
        return_assistant_tokens_mask=True,
        **template_kwargs(**kwargs),
    )
    return list(out["input_ids"]), list(out["assistant_masks"])


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


def _check_messages(messages: Messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"messages[{i}] must be a dict with a string 'role' (got {m!r:.80})")
        if "content" not in m and "reasoning_content" not in m:
            raise ValueError(f"messages[{i}] ({m['role']}) has no 'content'")
