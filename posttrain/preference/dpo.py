"""`posttrain dpo`: DPO on preference pairs with TRL's ``DPOTrainer``, in our run folder.

What TRL does as it is: the losses (``dpo.loss_type``: sigmoid, IPO, hinge, robust, ...), the
tokenisation of conversational pairs with the model's chat template (ours: thinking off unless
``data.enable_thinking``), LoRA through peft, the optimizer and schedule. What we configure or wrap,
and why: **reference log-probs computed once** (``precompute_ref_log_probs``): TRL's default keeps a
second copy of the model in memory and runs it every step; on a CPU box (or a big model) one pass
over the data before training is cheaper. ``dpo.reference=free`` uses zeros instead (no
reference). Atomic checkpoints, our metrics, the time budget and ``RUN/model``:
:mod:`posttrain.preference.trl_run`.

Held-out metrics: ``likelihood_accuracy`` -- the share of test pairs whose chosen response has the
higher mean token log-prob under the model (ties 0.5; meaningful before training too) --, and
TRL's ``reward_accuracy`` / ``reward_margin`` (the implicit DPO reward, beta x log-ratio to the
reference: 0 before training by definition) and ``loss``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import torch

from posttrain import models
from posttrain.errors import DataError
from posttrain.metrics import MetricsLogger
from posttrain.preference.config import DPOStageConfig
from posttrain.preference.pairs import preference_split
from posttrain.preference.trl_run import (atomic, callbacks, last_checkpoint, shared_dataset, train_and_save,
                                        trainer_arguments)

log = logging.getLogger(__name__)
EVAL_PREFIX = "eval/dpo/"
_EVAL_KEYS = {"eval_loss": "loss", "eval_rewards/accuracies": "reward_accuracy", "eval_rewards/margins": "reward_margin"}


def train(cfg: DPOStageConfig, *, resume: bool = False, stop_after: int | None = None) -> Path:
    """Run DPO; returns the final model folder (``RUN/model``). ``stop_after``: stop after that step
    without finishing (preemption drills, tests)."""
    from posttrain.training.model import count_params, prepare_for_training

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        log.warning("DPO on several processes is not yet proven equal to one: with TRL 1.16 on CPU/gloo the "
                    "gradients differ (tests/preference/test_reward_model.py, the xfail case); compare a few "
                    "steps with a single-process run before relying on it")
    last = last_checkpoint(Path(cfg.run_dir), resume)
    train_rows, test_rows = preference_split(cfg.data, "train"), preference_split(cfg.data, "test")
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    torch.manual_seed(cfg.train.seed)
    start = cfg.start_model()
    tokenizer = models.tokenizer_for(start)
    model = prepare_for_training(models.model_for(start, models.default_device()), cfg.train, cfg.lora)
    trainable, total = count_params(model)
    log.info("DPO: %d train / %d held-out pairs, %.2fM of %.2fM params trainable, losses %s, beta %g, reference %s",
             len(train_rows), len(test_rows), trainable / 1e6, total / 1e6, cfg.dpo.loss_type, cfg.dpo.beta,
             cfg.dpo.reference)
    return train_and_save(cfg, "dpo", tokenizer, last, EVAL_PREFIX,
                          lambda metrics: _trainer(cfg, model, tokenizer, train_rows, test_rows, metrics, stop_after),
                          held_out)


def _trainer(cfg: DPOStageConfig, model: Any, tokenizer: Any, train_rows: list[dict[str, Any]],
             test_rows: list[dict[str, Any]], metrics: MetricsLogger, stop_after: int | None = None) -> Any:
    from trl import DPOConfig, DPOTrainer

    class DPO(DPOTrainer):
        reference_free = cfg.dpo.reference == "free"

        def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
            if not self.reference_free:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            zeros = [0.0] * len(dataset)
            return dataset.add_column("ref_chosen_logps", zeros).add_column("ref_rejected_logps", zeros)

    args = DPOConfig(**trainer_arguments(cfg.train, Path(cfg.run_dir), cfg.progress),
                     beta=cfg.dpo.beta, loss_type=list(cfg.dpo.loss_type), loss_weights=cfg.dpo.loss_weights,
                     label_smoothing=cfg.dpo.label_smoothing, precompute_ref_log_probs=True)
    run_dir = Path(cfg.run_dir)
    train_set, test_set = shared_dataset(train_rows, run_dir, "train"), shared_dataset(test_rows, run_dir, "test")
    trainer = atomic(DPO)(model=model, args=args, train_dataset=train_set, eval_dataset=test_set,
                          processing_class=tokenizer, callbacks=callbacks(metrics, cfg.train.max_minutes, stop_after))
    if not len(trainer.train_dataset):
        raise DataError(f"no training pair fits train.max_length={cfg.train.max_length} tokens")
    return trainer


def held_out(trainer: Any) -> dict[str, float]:
    """The held-out metrics (``eval/dpo/...``) of the trainer's model on its eval set."""
    result = trainer.evaluate()
    out = {EVAL_PREFIX + short: float(result[key]) for key, short in _EVAL_KEYS.items() if key in result}
    out[EVAL_PREFIX + "likelihood_accuracy"] = likelihood_accuracy(trainer.model, trainer.eval_dataset,
                                                                   trainer.args.max_length)
    out[EVAL_PREFIX + "pairs"] = float(len(trainer.eval_dataset))
    return out


@torch.no_grad()
def likelihood_accuracy(model: Any, dataset: Any, max_length: int) -> float:
    """Share of pairs whose chosen response has the higher mean token log-prob (ties 0.5), each sequence
    cut at ``max_length`` tokens as in training."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    right = []
    for row in dataset:
        means = [_mean_logprob(model, row["prompt_ids"], row[k], device, max_length)
                 for k in ("chosen_ids", "rejected_ids")]
        right.append(0.5 if means[0] == means[1] else float(means[0] > means[1]))
    model.train(was_training)
    return sum(right) / len(right) if right else 0.0


def _mean_logprob(model: Any, prompt: list[int], completion: list[int], device: Any, max_length: int) -> float:
    completion = completion[:max(1, max_length - len(prompt))]
    ids = torch.tensor([prompt + completion], device=device)
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    picked = torch.log_softmax(logits, dim=-1).gather(1, ids[0, len(prompt):, None])
    return float(picked.mean())
