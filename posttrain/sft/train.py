"""The SFT driver: data -> model -> steps -> checkpoints, one readable loop.

Each optimizer step takes ``train.micro_batches_per_step`` micro-batches (split over the
data-parallel processes of ``torchrun``). The loss is the sum of token NLLs divided by the number
of loss tokens in the *whole step*, known before the forward pass from the plan, so it is the
same token mean whatever the micro-batch split, the packing, or the number of processes.
Gradients are summed over processes (``training/parallel.py``, gloo on CPU, NCCL on GPU): one
all-reduce per tensor with replicated weights, or FSDP2's reduce-scatter with
``train.fsdp.enabled`` (parameters, gradients and AdamW state sharded over the processes).
With ``train.context_parallel=N`` the N ranks of one cp group take the *same* micro-batches and
each computes the NLL of its share of every row (``training/context_parallel.py``); their tokens
are disjoint, so the same sums over all processes still give the whole step's loss and gradient.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain import models
from posttrain.atomic import atomic_dir, file_lock, remove_stale_tmp
from posttrain.config import write_resolved
from posttrain.errors import ConfigError
from posttrain.metrics import MetricsLogger
from posttrain.sft import data as sft_data
from posttrain.sft.config import SFTConfig
from posttrain.sft.packing import Mode, Step, collate, plan_steps, resolve_packing
from posttrain.training import context_parallel, parallel
from posttrain.training.checkpoint import latest_checkpoint, save_checkpoint
from posttrain.training.loss import causal_lm_nll_sum, in_root
from posttrain.training.model import count_params, forward_precision, prepare_for_training
from posttrain.training.parallel import Parallel
from posttrain.training.sharded_checkpoint import export_gathered, load_any_checkpoint, save_sharded_checkpoint

log = logging.getLogger(__name__)


@dataclass
class StepResult:
    loss: float  # token-mean NLL of the step
    grad_norm: float
    loss_tokens: int
    tokens: int  # non-pad tokens processed by all processes


def train_step(model: Any, optimizer: Any, scheduler: Any, step: Step, samples: list[sft_data.Tokenized],
               mode: Mode, pad_id: int, cfg: SFTConfig, d: Parallel, device: str) -> StepResult:
    """Forward/backward over this process's share of ``step``, sum gradients, clip, update."""
    loss_tokens = sum(samples[i].n_loss_tokens for mb in step for i in mb)  # global, same on every rank
    tokens = sum(len(samples[i].input_ids) for mb in step for i in mb)
    nll_total = torch.zeros((), dtype=torch.float32)
    for mb in step[d.dp_rank :: d.dp_size]:  # the ranks of one cp group take the same micro-batches
        batch = collate([(samples[i].input_ids, samples[i].loss_mask) for i in mb], mode, pad_id)
        batch = {k: v.to(device) for k, v in batch.items()}
        with forward_precision(cfg.train.mixed_precision, device):
            if d.cp > 1:  # this rank's share of every row; the other cp ranks hold the rest
                nll, _ = in_root(model, context_parallel.cp_nll_sum, model, batch, d.cp_group(),
                                 cfg.train.loss_chunk_size, pad_id)
            else:
                nll, _ = causal_lm_nll_sum(model, batch, cfg.train.loss_chunk_size)
        (nll / loss_tokens).backward()
        nll_total += nll.detach().float().cpu()
    params = [p for p in model.parameters() if p.requires_grad]
    if not parallel.is_sharded(model):  # FSDP summed them in backward
        parallel.all_reduce_grads(params, d)
    grad_norm = parallel.grad_norm(params, cfg.train.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(parallel.all_sum([float(nll_total)], d)[0] / loss_tokens, grad_norm, loss_tokens, tokens)


def save_final(model: Any, tokenizer: Any, run_dir: Path) -> Path:
    """``RUN/model``: a plain HF model folder (LoRA merged into the weights), written atomically."""
    target = run_dir / "model"
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    with file_lock(run_dir / ".model.lock"):
        remove_stale_tmp(target)
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
    return target


def build_optimizer(model: Any, cfg: SFTConfig, total_steps: int) -> tuple[Any, Any]:
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = get_scheduler(cfg.train.lr_scheduler, optimizer,
                              num_warmup_steps=int(cfg.train.warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    return optimizer, scheduler


def train(cfg: SFTConfig, *, resume: bool = False, stop_after: int | None = None) -> Path:
    """Run SFT; returns the run folder. ``stop_after`` ends early after that step (preemption drills, tests)."""
    d = parallel.init_from_env(cfg.train.context_parallel)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    run_dir = Path(cfg.run_dir)
    device = models.default_device()
    tokenizer = models.tokenizer_for(cfg.model)
    dataset = sft_data.build(cfg.data, tokenizer, cfg.train.micro_batch_tokens)  # bad rows fail here, before the model
    torch.manual_seed(cfg.train.seed)
    model = models.model_for(cfg.model, device)
    mode = resolve_packing(cfg.train.packing, model)
    model = prepare_for_training(model, cfg.train, cfg.lora)
    trainable, total = count_params(model)  # before sharding: the whole model's counts
    if d.cp > 1:  # attention over the cp group (refuses layers it cannot split exactly)
        context_parallel.enable_context_parallel(model)
    if cfg.train.fsdp.enabled:
        model = parallel.shard_model(model, d, cfg.train.fsdp)
    if cfg.train.micro_batches_per_step % d.dp_size:
        raise ConfigError(f"train.micro_batches_per_step={cfg.train.micro_batches_per_step} must be a multiple "
                          f"of the number of data-parallel processes ({d.dp_size})")
    steps = plan_steps([len(s.input_ids) for s in dataset.samples], max_tokens=cfg.train.micro_batch_tokens,
                       micro_batches_per_step=cfg.train.micro_batches_per_step, epochs=cfg.train.epochs,
                       seed=cfg.train.seed, mode=mode, max_steps=cfg.train.max_steps)
    optimizer, scheduler = build_optimizer(model, cfg, len(steps))
    start = 0
    ckpt = latest_checkpoint(run_dir) if resume else None
    if resume and ckpt is None:
        log.info("no checkpoint in %s yet: starting from step 0", run_dir)
    if ckpt is not None:
        start = int(load_any_checkpoint(ckpt, model, optimizer, scheduler)["step"])
        log.info("resumed from %s (step %d of %d)", ckpt.path, start, len(steps))
    if d.main:
        write_resolved(cfg, run_dir)
        log.info("%d samples (%s; %d overlong dropped), %s, %d steps x %d micro-batches of <= %d tokens, "
                 "%d processes (%d data-parallel x %d context-parallel), %.2fM of %.2fM params trainable",
                 len(dataset.samples), dataset.modes, dataset.dropped_overlong, mode, len(steps),
                 cfg.train.micro_batches_per_step, cfg.train.micro_batch_tokens, d.world, d.dp_size, d.cp,
                 trainable / 1e6, total / 1e6)
    _loop(model, optimizer, scheduler, steps, dataset.samples, mode, tokenizer, cfg, d, device, start, stop_after)
    if stop_after is None or stop_after >= len(steps):
        if cfg.train.fsdp.enabled:  # every rank takes part: gathered one tensor at a time
            final = export_gathered(model, tokenizer, run_dir / "model", d)
        elif d.main:
            final = save_final(model, tokenizer, run_dir)
        if d.main:
            log.info("final model: %s", final)
    return run_dir


def _loop(model: Any, optimizer: Any, scheduler: Any, steps: list[Step], samples: list[sft_data.Tokenized],
          mode: Mode, tokenizer: Any, cfg: SFTConfig, d: Parallel, device: str, start: int,
          stop_after: int | None) -> None:
    from tqdm import tqdm

    metrics = MetricsLogger(cfg.run_dir, stage="sft", loggers=cfg.loggers, config=cfg.model_dump(mode="json")) \
        if d.main else None  # metrics.jsonl + TensorBoard + Ray
    bar = tqdm(total=len(steps), initial=start, desc="sft", unit="step", disable=not (d.main and cfg.progress))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    seen = 0
    for index in range(start, len(steps)):
        t0 = time.perf_counter()
        r = train_step(model, optimizer, scheduler, steps[index], samples, mode, pad_id, cfg, d, device)
        step, tok_s = index + 1, r.tokens / (time.perf_counter() - t0)
        seen += r.tokens
        bar.update(1)
        bar.set_postfix(loss=f"{r.loss:.4f}", tok_s=f"{tok_s:.0f}", refresh=False)
        if metrics is not None and step % cfg.train.log_every == 0:
            metrics.log(step, {"train/loss": r.loss, "train/grad_norm": r.grad_norm, "train/lr": scheduler.get_last_lr()[0],
                               "train/tokens_per_s": tok_s, "train/loss_tokens": r.loss_tokens})
            if not cfg.progress:
                log.info("step %d/%d loss %.4f grad_norm %.3f %.0f tok/s", step, len(steps), r.loss, r.grad_norm, tok_s)
        every = cfg.train.save_every
        last = step == len(steps) or step == stop_after
        if (every and step % every == 0) or last:
            state = {"tokens_this_session": seen}
            if cfg.train.fsdp.enabled:  # every rank writes its shard
                save_sharded_checkpoint(cfg.run_dir, step, model, optimizer, scheduler, tokenizer, state,
                                        cfg.train.keep_last, d)
            elif d.main:
                save_checkpoint(cfg.run_dir, step, model, optimizer, scheduler, tokenizer, state,
                                keep_last=cfg.train.keep_last)
        if step == stop_after:
            break
    bar.close()
    if metrics is not None:
        metrics.close()
    parallel.barrier(d)
