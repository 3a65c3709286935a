"""A TRL trainer (``DPOTrainer``, ``RewardTrainer``) run in our run folder: what ``posttrain dpo`` and
``posttrain rm train`` share.

* **Atomic checkpoints**: the HF Trainer writes ``checkpoint-N`` in place, so a kill leaves a
  half-written folder that resume would pick up. Here each is written under a hidden name and
  renamed into ``RUN/checkpoints/checkpoint-N`` when complete; ``--resume`` continues from the last
  (optimizer, schedule, RNG and data position: the Trainer's own resume).
* **Our metrics**: TRL's log rows go to ``RUN/metrics.jsonl`` (and TensorBoard, Ray gauges, W&B or
  MLflow as ``loggers`` say) as ``train/...``, not to TRL's reporters; the stage's held-out metrics
  are logged at step 0 and at the last step (the report's before/after), once each across resumes.
* **A time budget** (``train.max_minutes``, of training, counted from its first step in each
  launch): the run stops at the first step past it, saves a checkpoint there and ends as a
  finished run would (held-out after, ``RUN/model``).
* **The final model** is ``RUN/model``, LoRA merged, written atomically.
* **Several processes** (``torchrun`` or ``accelerate launch``; the HF Trainer runs on accelerate,
  DDP, or FSDP/DeepSpeed from an accelerate config): batch sizes count pairs over all of them,
  rank 0 alone writes the config, metrics and ``RUN/model``, and checkpoints are staged and renamed
  between barriers, every process writing its own part.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from posttrain.errors import ConfigError
from posttrain.metrics import MetricsLogger
from posttrain.preference.config import PreferenceTrainConfig

log = logging.getLogger(__name__)


def last_checkpoint(run_dir: Path, resume: bool) -> str | None:
    """The checkpoint to resume from; an error when the folder has one and ``resume`` is off."""
    from transformers.trainer_utils import get_last_checkpoint

    checkpoints = run_dir / "checkpoints"
    last = get_last_checkpoint(str(checkpoints)) if checkpoints.is_dir() else None
    if last and not resume:
        raise ConfigError(f"run_dir {str(run_dir)!r} already holds checkpoints: pass --resume to continue that run, "
                          "or choose another run_dir")
    return last


def trainer_arguments(t: PreferenceTrainConfig, run_dir: Path, progress: bool) -> dict[str, Any]:
    """The ``TrainingArguments`` keys both stages set the same way (batch sizes over every process,
    checkpoints under ``RUN/checkpoints``, no TRL reporters, bf16 on CUDA, on CPU fp32 unless
    ``mixed_precision: bf16``: the Trainer's CPU autocast)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()
    return dict(
        output_dir=str(run_dir / "checkpoints"), per_device_train_batch_size=t.micro_batch_size,
        per_device_eval_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=max(1, t.batch_size // (t.micro_batch_size * world)),
        learning_rate=t.lr, num_train_epochs=t.epochs, max_steps=t.max_steps or -1, lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_ratio, weight_decay=t.weight_decay, max_grad_norm=t.max_grad_norm, seed=t.seed,
        logging_steps=1, save_strategy="steps", save_steps=t.save_every, save_total_limit=t.keep_last,
        eval_strategy="no", report_to=[], disable_tqdm=not progress, use_cpu=not cuda, bf16=cuda or t.mixed_precision == "bf16",
        gradient_checkpointing=False,  # prepare_for_training set it up as configured
        max_length=t.max_length, dataset_num_proc=None)


def shared_dataset(rows: list[dict[str, Any]], run_dir: Path, name: str) -> Any:
    """``rows`` as a ``datasets.Dataset`` backed by ``RUN/data/<name>.jsonl`` (written by rank 0, read by all).

    TRL caches what it computes per dataset (DPO's reference log-probs) next to the dataset's files; an
    in-memory dataset has none, so each process would cache in its own temporary folder and the others
    would not find rank 0's file. A file-backed dataset gives every process the same cache. Call it
    after the trainer's arguments exist (they set up the processes).
    """
    import json

    from accelerate import PartialState
    from datasets import Dataset

    from posttrain.atomic import atomic_write_text

    path = run_dir / "data" / f"{name}.jsonl"
    state = PartialState()
    with state.main_process_first():
        if state.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))
        return Dataset.from_json(str(path), cache_dir=str(run_dir / "data" / "cache"))


def atomic(trainer_cls: type) -> type:
    """``trainer_cls`` whose checkpoints appear whole (:func:`save_atomically`)."""

    class Atomic(trainer_cls):  # type: ignore[misc, valid-type]
        def _save_checkpoint(self, model: Any, trial: Any) -> None:
            save_atomically(self, super()._save_checkpoint, model, trial)

    Atomic.__name__ = f"Atomic{trainer_cls.__name__}"
    return Atomic


def callbacks(metrics: MetricsLogger, max_minutes: float | None, stop_after: int | None = None) -> list[Any]:
    """Log rows into ``metrics`` (``train/...``); stop past ``max_minutes`` (with a checkpoint) or right
    after step ``stop_after`` (an interruption: tests and preemption drills)."""
    from transformers import TrainerCallback

    class ToMetrics(TrainerCallback):
        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
            if logs and not any(k.startswith("eval_") for k in logs):
                metrics.log(state.global_step, {f"train/{k}": v for k, v in logs.items()
                                                if isinstance(v, (int, float)) and k != "epoch"})

    class Budget(TrainerCallback):
        deadline: float | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            # the clock starts with training (after loading, tokenising, DPO's reference pass), per launch
            self.deadline = time.monotonic() + 60 * max_minutes if max_minutes else None

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.deadline is not None and _any_process(time.monotonic() > self.deadline) \
                    and not control.should_training_stop:
                log.info("train.max_minutes=%g reached at step %d: saving and stopping", max_minutes, state.global_step)
                control.should_training_stop = control.should_save = True
            if not control.should_save:
                self._interrupt(state)

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._interrupt(state)  # after the step's checkpoint, as a kill right after it

        def _interrupt(self, state: Any) -> None:
            if stop_after is not None and state.global_step >= stop_after:
                raise Interrupted(state.global_step)

    return [ToMetrics(), Budget()]


def _any_process(flag: bool) -> bool:
    """``flag`` of any process (all stop at the same step, or the others would wait for it forever)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return flag
    value = torch.tensor([float(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


class Interrupted(Exception):
    """Training stopped on purpose after a step (``stop_after``), as a kill would stop it."""


def fit(trainer: Any, run_dir: Path, metrics: MetricsLogger | NullMetrics, last: str | None, prefix: str,
        held_out: Callable[[Any], dict[str, float]]) -> bool:
    """Held-out metrics at step 0, training (from ``last``), held-out metrics at the last step; each
    measurement skipped when a resumed run logged it already (every process decides the same, before
    rank 0 writes). False when interrupted (``stop_after``)."""
    from posttrain.report_data import logged_at

    barrier = _barrier(trainer)

    def measure(step: int) -> None:
        barrier()
        todo = not logged_at(run_dir, step, prefix)
        barrier()
        if todo:
            metrics.log(step, held_out(trainer))  # every process measures (DPO's evaluate is collective)

    measure(0)
    try:
        trainer.train(resume_from_checkpoint=last)
    except Interrupted as stop:
        log.info("interrupted after step %d (stop_after)", stop.args[0])
        return False
    measure(trainer.state.global_step)  # a finished run resumed: measured already
    return True


def train_and_save(cfg: Any, stage: str, tokenizer: Any, last: str | None, prefix: str,
                   make_trainer: Callable[[MetricsLogger | NullMetrics], Any],
                   held_out: Callable[[Any], dict[str, float]]) -> Path:
    """A stage's run: its metrics, ``make_trainer(metrics)``'s training between held-out measurements
    (:func:`fit`), then ``RUN/model`` from rank 0; returns ``RUN/model`` (not written when interrupted)."""
    from posttrain.sft.train import save_final

    run_dir = Path(cfg.run_dir)
    metrics = stage_metrics(run_dir, stage, cfg.loggers, cfg)
    try:
        trainer = make_trainer(metrics)
        if not fit(trainer, run_dir, metrics, last, prefix, held_out) or not is_main_process():
            return run_dir / "model"
    finally:
        metrics.close()
    final = save_final(trainer.model, tokenizer, run_dir)
    log.info("final model: %s", final)
    return final


def save_atomically(trainer: Any, save: Any, model: Any, trial: Any) -> None:
    """HF's ``_save_checkpoint`` into a hidden staging folder, renamed to ``checkpoint-N`` when complete.

    The Trainer writes its checkpoint folder in place and rotates old ones afterwards; here the
    whole folder appears at once (a kill mid-save leaves only the staging folder, removed next
    time), then old ones are rotated as the Trainer would.
    """
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

    root = Path(trainer.args.output_dir)
    staging = root / ".staging"
    main, barrier = trainer.args.should_save, _barrier(trainer)
    if main:
        shutil.rmtree(staging, ignore_errors=True)
    barrier()  # every process writes its part (its RNG state) into the fresh staging folder
    name = f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    keep = trainer.args.save_total_limit
    trainer.args.output_dir, trainer.args.save_total_limit = str(staging), None
    try:
        save(model, trial)
    finally:
        trainer.args.output_dir, trainer.args.save_total_limit = str(root), keep
    barrier()
    if main:
        final = root / name
        if final.exists():  # saved again at the same step (the end of a resumed, finished run)
            shutil.rmtree(final)
        os.replace(staging / name, final)
        shutil.rmtree(staging, ignore_errors=True)
        done = sorted((p for p in root.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.name.split("-")[-1].isdigit()),
                      key=lambda p: int(p.name.split("-")[-1]))
        for old in done[:-keep] if keep else []:
            shutil.rmtree(old, ignore_errors=True)
    barrier()


def _barrier(trainer: Any) -> Callable[[], None]:
    accelerator = getattr(trainer, "accelerator", None)
    return accelerator.wait_for_everyone if accelerator is not None else (lambda: None)


def is_main_process() -> bool:
    """Rank 0 of a multi-process launch (torchrun, ``accelerate launch``), or a single process."""
    return int(os.environ.get("RANK", "0")) == 0


class NullMetrics:
    """The metrics of a process other than rank 0: rank 0 logs for all."""

    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def close(self) -> None:
        pass


def stage_metrics(run_dir: Path, stage: str, loggers: list[str], config: Any) -> MetricsLogger | NullMetrics:
    """The stage's metrics logger on rank 0 (which also writes the resolved config); a null one elsewhere."""
    from posttrain.config import write_resolved

    if not is_main_process():
        return NullMetrics()
    write_resolved(config, run_dir)
    return MetricsLogger(run_dir, stage=stage, loggers=loggers, config=config.model_dump(mode="json"))
