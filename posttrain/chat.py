"""`posttrain chat`: one prompt through HF ``generate``, tokens streamed to the terminal."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any, TextIO

from posttrain import chat_template, models
from posttrain.config import ChatConfig
from posttrain.errors import ConfigError
from posttrain.rollout.budget import HFThinkingBudget


@dataclass(frozen=True)
class ChatResult:
    text: str  # the raw completion (reasoning + answer)
    completion: chat_template.ReasoningSplit
    new_tokens: int
    reasoning_tokens: int | None  # counted by the budget processor when one ran
    seconds: float


class _Streamer:
    """Prints decoded text as tokens arrive (TextStreamer without its prompt handling)."""

    def __init__(self, tokenizer: Any, out: TextIO) -> None:
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = 0
        self.prompt_seen = False

    def put(self, value: Any) -> None:
        if not self.prompt_seen:  # generate() first sends the prompt
            self.prompt_seen = True
            return
        self.ids.extend(int(t) for t in value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # half of a multi-byte character: wait for the rest
            return
        self.out.write(text[self.printed :])
        self.out.flush()
        self.printed = len(text)

    def end(self) -> None:
        self.out.write("\n")
        self.out.flush()


def chat(cfg: ChatConfig, prompt: str, *, out: TextIO | None = sys.stdout,
         model: Any = None, tokenizer: Any = None) -> ChatResult:
    import torch
    from transformers import LogitsProcessorList

    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError("prompt is empty: give the question as the last argument")
    if model is None or tokenizer is None:
        model, tokenizer = models.load(cfg.model)
    gen = cfg.generation
    messages = ([{"role": "system", "content": cfg.system}] if cfg.system else []) + [
        {"role": "user", "content": prompt}
    ]
    thinking = chat_template.thinking_enabled(messages, gen.enable_thinking)
    text = chat_template.render(tokenizer, messages, add_generation_prompt=True,
                                enable_thinking=gen.enable_thinking, reasoning_budget=gen.reasoning_budget)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
    budget = HFThinkingBudget(tokenizer, gen.reasoning_budget) if thinking and gen.reasoning_budget is not None else None
    streamer = _Streamer(tokenizer, out) if out is not None else None
    if out is not None and thinking:
        out.write(chat_template.THINK_OPEN + "\n")  # the prompt opened it; show it
    torch.manual_seed(gen.seed)
    sampling = dict(do_sample=True, temperature=gen.temperature, top_p=gen.top_p) if gen.temperature > 0 else dict(do_sample=False)
    start = time.perf_counter()
    with torch.inference_mode():
        output = model.generate(
            **inputs, max_new_tokens=gen.max_new_tokens, streamer=streamer,
            logits_processor=LogitsProcessorList([budget] if budget else []),
            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **sampling,
        )
    seconds = time.perf_counter() - start
    new_ids = output[0, inputs["input_ids"].shape[1] :]
    completion_text = tokenizer.decode(new_ids, skip_special_tokens=True)
    return ChatResult(
        text=completion_text,
        completion=chat_template.split_reasoning(completion_text, started_in_reasoning=thinking),
        new_tokens=int(new_ids.numel()),
        reasoning_tokens=budget.trackers[0].reasoning_tokens if budget and budget.trackers else None,
        seconds=seconds,
    )
