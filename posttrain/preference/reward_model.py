"""Scalar (Bradley-Terry) reward models: loading, scoring conversations, held-out pairwise accuracy.

A reward model is an ``AutoModelForSequenceClassification`` with one label: the score of a whole
conversation is read at its last token. :class:`RewardScorer` tokenises a conversation exactly as
TRL's ``RewardTrainer`` did in training (the model's chat template -- ours, thinking off unless
asked -- over prompt + response), so ``posttrain rm eval``, the held-out metrics of ``rm train``
and the ``reward_model`` environment read the same numbers. A sequence longer than ``max_length``
keeps its end (the response the score is about) and loses the start of its prompt.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from posttrain.config import ModelConfig
from posttrain.preference.config import RMEvalConfig

log = logging.getLogger(__name__)
Messages = list[dict[str, str]]
EVAL_PREFIX = "eval/rm/"


def load_reward_model(cfg: ModelConfig, device: str | None = None, *, seed: int = 0) -> Any:
    """``cfg``'s model with a one-label classification head (a causal LM gets a new head drawn with ``seed``)."""
    from posttrain import models

    torch.manual_seed(seed)
    return models.load_model(cfg.name, dtype=cfg.dtype, device=device, revision=cfg.revision,
                             trust_remote_code=cfg.trust_remote_code, num_labels=1)


def conversation_ids(tokenizer: Any, messages: Messages, enable_thinking: bool = False) -> list[int]:
    """Token ids of a whole conversation as ``RewardTrainer`` tokenises it."""
    return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                              enable_thinking=enable_thinking)["input_ids"])


class RewardScorer:
    """Scores conversations with a reward model (batched, no gradients)."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 8, max_length: int = 1024) -> None:
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id  # where the head reads: the last non-pad token
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_length = batch_size, max_length

    @classmethod
    def load(cls, cfg: ModelConfig, device: str | None = None, **kw: Any) -> RewardScorer:
        from posttrain import models

        return cls(load_reward_model(cfg, device), models.tokenizer_for(cfg), **kw)

    @torch.no_grad()
    def score(self, conversations: Sequence[Messages], enable_thinking: bool = False) -> list[float]:
        ids = [conversation_ids(self.tokenizer, c, enable_thinking)[-self.max_length:] for c in conversations]
        return self.score_ids(ids)

    @torch.no_grad()
    def score_ids(self, sequences: Sequence[list[int]]) -> list[float]:
        was_training = self.model.training
        self.model.eval()
        device = next(self.model.parameters()).device
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))  # similar lengths batched together
        out = [0.0] * len(sequences)
        for lo in range(0, len(order), self.batch_size):
            batch = [sequences[i] for i in order[lo:lo + self.batch_size]]
            width = max(len(s) for s in batch)
            ids = torch.full((len(batch), width), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for row, seq in enumerate(batch):
                ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            # the head reads each row at its last non-pad token, as in training (TRL pads the same way)
            logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            for i, value in zip(order[lo:lo + self.batch_size], logits.float().cpu()[:, 0].tolist()):
                out[i] = value
        self.model.train(was_training)
        return out


def pair_scores(scorer: RewardScorer, rows: Sequence[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """(chosen, rejected) scores of preference rows (:func:`posttrain.preference.pairs.preference_rows`)."""
    convs = [row["prompt"] + row[side] for row in rows for side in ("chosen", "rejected")]
    thinking = [row.get("chat_template_kwargs", {}).get("enable_thinking", False) for row in rows]
    scores = scorer.score(convs, enable_thinking=bool(thinking and thinking[0]))
    return scores[0::2], scores[1::2]


def pairwise_metrics(rows: Sequence[dict[str, Any]], chosen: Sequence[float],
                     rejected: Sequence[float]) -> dict[str, float]:
    """``pairwise_accuracy`` (chosen scored higher; ties 0.5) with its standard error, per category
    (``pairwise_accuracy/<category>``), the mean score margin, and ``n_pairs`` -- ``genrm eval``'s names."""
    right = [0.5 if c == r else float(c > r) for c, r in zip(chosen, rejected)]
    n = len(right)
    if not n:
        raise ValueError("pairwise_metrics needs at least one pair")
    accuracy = sum(right) / n
    out = {"n_pairs": float(n), "pairwise_accuracy": accuracy,
           "pairwise_accuracy_se": math.sqrt(accuracy * (1 - accuracy) / n),
           "mean_margin": sum(c - r for c, r in zip(chosen, rejected)) / n,
           "mean_score": (sum(chosen) + sum(rejected)) / (2 * n)}
    by_category: dict[str, list[float]] = {}
    for row, ok in zip(rows, right):
        if row.get("category"):
            by_category.setdefault(row["category"], []).append(ok)
    out.update({f"pairwise_accuracy/{c}": sum(v) / len(v) for c, v in sorted(by_category.items())})
    return out


def evaluate(cfg: RMEvalConfig) -> dict[str, float]:
    """Held-out pairwise accuracy of ``cfg.model`` on ``cfg.data``'s test pairs."""
    from posttrain.preference.pairs import preference_split

    rows = preference_split(cfg.data, "test")
    scorer = RewardScorer.load(cfg.model, batch_size=cfg.batch_size, max_length=cfg.max_length)
    metrics = pairwise_metrics(rows, *pair_scores(scorer, rows))
    log.info("reward model %s: pairwise accuracy %.3f +- %.3f on %d held-out pairs", cfg.model.name,
             metrics["pairwise_accuracy"], metrics["pairwise_accuracy_se"], int(metrics["n_pairs"]))
    return metrics
