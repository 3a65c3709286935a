"""`posttrain dpo`: DPO on preference pairs with TRL's ``DPOTrainer``, in our run folder.

What TRL does as it is: the losses (``dpo.loss_type``: sigmoid, IPO, hinge, robust, ...), the
tokenisation of conversational pairs with the model's chat template (ours: thinking off unless
``data.enable_thinking``), LoRA through peft, the optimizer and schedule. What we configure or wrap,
and why:

* **Reference log-probs computed once** (``precompute_ref_log_probs``): TRL's default keeps a second
  copy of the model in memory and runs it every step; on a CPU box (or a big model) one pass over
  the data before training is cheaper. ``dpo.reference=free`` uses zeros instead (no reference).
* **Atomic checkpoints**: the HF Trainer writes ``checkpoint-N`` in place, so a kill leaves a
  half-written folder that resume would pick up. Here each is written under a hidden name and
  renamed into ``RUN/checkpoints/checkpoint-N`` when complete; ``--resume`` continues from the last.
* **Our metrics**: every log row goes to ``RUN/metrics.jsonl`` (and TensorBoard, Ray gauges, W&B or
  MLflow as ``loggers`` say), not to TRL's reporters; held-out metrics before and after training at
  step 0 and the last step (``eval/dpo/...``), the report's before/after.
* **The final model** is ``RUN/model``, LoRA merged, written atomically.

Held-out metrics: ``likelihood_accuracy`` -- the share of test pairs whose chosen response has the
higher mean token log-prob under the model (ties 0.5; meaningful before training too) --, and
TRL's ``reward_accuracy`` / ``reward_margin`` (the implicit DPO reward, beta x log-ratio to the
reference: 0 before training by definition) and ``loss``.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from posttrain import models
from posttrain.config import write_resolved
from posttrain.errors import ConfigError, DataError
from posttrain.metrics import MetricsLogger
from posttrain.preference.config import DPOStageConfig
from posttrain.preference.pairs import preference_rows

log = logging.getLogger(__name__)
EVAL_PREFIX = "eval/dpo/"
_EVAL_KEYS = {"eval_loss": "loss", "eval_rewards/accuracies": "reward_accuracy", "eval_rewards/margins": "reward_margin"}


def train(cfg: DPOStageConfig, *, resume: bool = False) -> Path:
    """Run DPO; returns the final model folder (``RUN/model``)."""
    from datasets import Dataset
    from transformers.trainer_utils import get_last_checkpoint

    from posttrain.report_data import logged_at
    from posttrain.sft.train import save_final
    from posttrain.training.model import count_params, prepare_for_training

    run_dir = Path(cfg.run_dir)
    checkpoints = run_dir / "checkpoints"
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if last and not resume:
        raise ConfigError(f"run_dir {cfg.run_dir!r} already holds checkpoints: pass --resume to continue that run, "
                          "or choose another run_dir")
    data = cfg.data
    train_rows = preference_rows(data.path, "train", limit=data.limit, subset=data.subset, system=data.system,
                                 enable_thinking=data.enable_thinking)
    test_rows = preference_rows(data.test_path or data.path, "test", limit=data.test_limit, subset=data.subset,
                                system=data.system, enable_thinking=data.enable_thinking)
    write_resolved(cfg, run_dir)
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
    metrics = MetricsLogger(run_dir, stage="dpo", loggers=cfg.loggers, config=cfg.model_dump(mode="json"))
    try:
        trainer = _trainer(cfg, model, tokenizer, Dataset.from_list(train_rows), Dataset.from_list(test_rows),
                           checkpoints, metrics)
        if not logged_at(run_dir, 0, EVAL_PREFIX):
            metrics.log(0, held_out(trainer))
        trainer.train(resume_from_checkpoint=last)
        if not logged_at(run_dir, trainer.state.global_step, EVAL_PREFIX):  # a finished run resumed: measured
            metrics.log(trainer.state.global_step, held_out(trainer))
    finally:
        metrics.close()
    final = save_final(trainer.model, tokenizer, run_dir)
    log.info("final model: %s", final)
    return final


def _trainer(cfg: DPOStageConfig, model: Any, tokenizer: Any, train_set: Any, test_set: Any, checkpoints: Path,
             metrics: MetricsLogger) -> Any:
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class AtomicDPOTrainer(DPOTrainer):
        reference_free = cfg.dpo.reference == "free"

        def _precompute_ref_logps(self, dataset: Any, name: str, batch_size: int) -> Any:
            if not self.reference_free:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            zeros = [0.0] * len(dataset)
            return dataset.add_column("ref_chosen_logps", zeros).add_column("ref_rejected_logps", zeros)

        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            save_atomically(self, super()._save_checkpoint, model, trial)

    class ToMetrics(TrainerCallback):
        """TRL's log rows into our metrics (train/...), held-out rows are logged by ``train``."""

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if logs and not any(k.startswith("eval_") for k in logs):
                metrics.log(state.global_step, {f"train/{k}": v for k, v in logs.items()
                                                if isinstance(v, (int, float)) and k != "epoch"})

    t, world = cfg.train, int(os.environ.get("WORLD_SIZE", "1"))
    accumulation = max(1, t.batch_size // (t.micro_batch_size * world))
    cuda = torch.cuda.is_available()
    args = DPOConfig(
        output_dir=str(checkpoints), per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size, gradient_accumulation_steps=accumulation,
        learning_rate=t.lr, num_train_epochs=t.epochs, max_steps=t.max_steps or -1, lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, seed=t.seed,
        logging_steps=1, save_strategy="steps", save_steps=t.save_every, save_total_limit=t.keep_last,
        eval_strategy="no", report_to=[], disable_tqdm=not cfg.progress, use_cpu=not cuda, bf16=cuda,
        gradient_checkpointing=False,  # prepare_for_training set it up as configured
        max_length=t.max_length, beta=cfg.dpo.beta, loss_type=list(cfg.dpo.loss_type),
        loss_weights=cfg.dpo.loss_weights, label_smoothing=cfg.dpo.label_smoothing,
        precompute_ref_log_probs=True, dataset_num_proc=None)
    trainer = AtomicDPOTrainer(model=model, args=args, train_dataset=train_set, eval_dataset=test_set,
                               processing_class=tokenizer, callbacks=[ToMetrics()])
    if not len(trainer.train_dataset):
        raise DataError(f"no training pair fits train.max_length={t.max_length} tokens")
    return trainer


def save_atomically(trainer: Any, save: Any, model: Any, trial: Any) -> None:
    """HF's ``_save_checkpoint`` into a hidden staging folder, renamed to ``checkpoint-N`` when complete.

    The Trainer writes its checkpoint folder in place and rotates old ones afterwards; here the
    whole folder appears at once (a kill mid-save leaves only the staging folder, removed next
    time), then old ones are rotated as the Trainer would.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    root = Path(trainer.args.output_dir)
    staging = root / ".staging"
    shutil.rmtree(staging, ignore_errors=True)
    name = f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    keep = trainer.args.save_total_limit
    trainer.args.output_dir, trainer.args.save_total_limit = str(staging), None
    try:
        save(model, trial)
    finally:
        trainer.args.output_dir, trainer.args.save_total_limit = str(root), keep
    final = root / name
    if final.exists():  # saved again at the same step (the end of a resumed, finished run)
        shutil.rmtree(final)
    os.replace(staging / name, final)
    shutil.rmtree(staging, ignore_errors=True)
    done = sorted((p for p in root.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.name.split("-")[-1].isdigit()),
                  key=lambda p: int(p.name.split("-")[-1]))
    for old in done[:-keep] if keep else []:
        shutil.rmtree(old, ignore_errors=True)


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
