"""`posttrain rm train`: a Bradley-Terry scalar reward model with TRL's ``RewardTrainer``, in our run folder.

What TRL does as it is: the loss (-log sigmoid(r_chosen - r_rejected - margin), plus the optional
centring term), tokenising conversational pairs with the model's chat template, the collator, the
optimizer and schedule. What we set: the model is loaded here as a one-label
``AutoModelForSequenceClassification`` from any of our model names (built-ins, folders, hub ids) and
prepared as every stage prepares it; LoRA trains the new ``score`` head in full
(``modules_to_save``), as TRL advises; the label strength is the margin, scaled by
``rm.margin_scale`` (0 drops it). Checkpoints, metrics, the time budget and ``RUN/model``:
:mod:`posttrain.preference.trl_run`.

Held-out metrics (``eval/rm/...``, step 0 = the untrained head, and the last step): pairwise
accuracy with its standard error, per category, and the mean score margin -- read by
:class:`~posttrain.preference.reward_model.RewardScorer`, the scorer of ``rm eval`` and the
``reward_model`` environment.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from posttrain import models
from posttrain.errors import DataError
from posttrain.preference.config import RMStageConfig
from posttrain.preference.pairs import preference_split
from posttrain.preference.reward_model import (EVAL_PREFIX, RewardScorer, load_reward_model, pair_scores,
                                              pairwise_metrics)
from posttrain.preference.trl_run import (atomic, callbacks, last_checkpoint, shared_dataset, train_and_save,
                                        trainer_arguments)

log = logging.getLogger(__name__)


def train(cfg: RMStageConfig, *, resume: bool = False, stop_after: int | None = None) -> Path:
    """Train the reward model; returns ``RUN/model``. ``stop_after``: stop after that step without
    finishing (preemption drills, tests)."""
    from posttrain.training.model import count_params, prepare_for_training

    last = last_checkpoint(Path(cfg.run_dir), resume)
    train_rows, test_rows = preference_split(cfg.data, "train"), preference_split(cfg.data, "test")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    start = cfg.start_model()
    tokenizer = models.tokenizer_for(start)
    model = load_reward_model(start, models.default_device(), seed=cfg.train.seed)
    model = prepare_for_training(model, cfg.train, cfg.lora, task_type="SEQ_CLS", modules_to_save=["score"])
    trainable, total = count_params(model)
    log.info("reward model: %d train / %d held-out pairs, %.2fM of %.2fM params trainable, margin x%g",
             len(train_rows), len(test_rows), trainable / 1e6, total / 1e6, cfg.rm.margin_scale)
    return train_and_save(cfg, "rm", tokenizer, last, EVAL_PREFIX,
                          lambda metrics: _trainer(cfg, model, tokenizer, train_rows, metrics, stop_after),
                          lambda trainer: held_out(trainer, test_rows))


def _with_margins(rows: list[dict[str, Any]], margin_scale: float) -> list[dict[str, Any]]:
    """TRL's rows: the margin scaled (dropped at 0: plain Bradley-Terry), no category."""
    out = []
    for row in rows:
        kept = {k: v for k, v in row.items() if k not in ("category", "margin")}
        if margin_scale:
            kept["margin"] = margin_scale * row["margin"]
        out.append(kept)
    return out


def _trainer(cfg: RMStageConfig, model: Any, tokenizer: Any, train_rows: list[dict[str, Any]],
             metrics: Any, stop_after: int | None = None) -> Any:
    from trl import RewardConfig, RewardTrainer

    args = RewardConfig(**trainer_arguments(cfg.train, Path(cfg.run_dir), cfg.progress),
                        center_rewards_coefficient=cfg.rm.center_rewards_coefficient or None)
    train_set = shared_dataset(_with_margins(train_rows, cfg.rm.margin_scale), Path(cfg.run_dir), "train")
    trainer = atomic(RewardTrainer)(model=model, args=args, train_dataset=train_set, processing_class=tokenizer,
                                    callbacks=callbacks(metrics, cfg.train.max_minutes, stop_after))
    if not len(trainer.train_dataset):
        raise DataError(f"no training pair fits train.max_length={cfg.train.max_length} tokens")
    if len(trainer.train_dataset) < len(train_set):
        log.warning("%d of %d training pairs are longer than train.max_length=%d tokens and are left out "
                    "(TRL's RewardTrainer filters, it does not cut)", len(train_set) - len(trainer.train_dataset),
                    len(train_set), cfg.train.max_length)
    return trainer


def held_out(trainer: Any, rows: list[dict[str, Any]]) -> dict[str, float]:
    """``eval/rm/...`` of the trainer's model on the held-out rows."""
    scorer = RewardScorer(trainer.model, trainer.processing_class, batch_size=trainer.args.per_device_eval_batch_size,
                          max_length=trainer.args.max_length)
    return {EVAL_PREFIX + k: v for k, v in pairwise_metrics(rows, *pair_scores(scorer, rows)).items()}
