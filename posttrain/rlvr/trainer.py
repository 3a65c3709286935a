"""The policy trainer: logprobs, the clipped policy-gradient update, weights for sync, checkpoints.

A plain class so it can be tested directly; the RLVR loop runs it as the Ray actors
``trainer-0..`` of a :class:`posttrain.rlvr.trainer_group.TrainerGroup` (data parallel: each
worker trains a share of every batch, gradients are summed; with ``train.context_parallel=N``
groups of N workers take the same share and each runs its part of every row). One optimizer step per batch of
rollouts by default (``minibatches=1``): then the rollouts are exactly on-policy for the
trainer, the "old" logprobs are the current ones (detached) and no extra forward pass is
needed; with more minibatches the old logprobs are computed once up front and the PPO clip
does its job.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import Any

import torch

from posttrain import models
from posttrain.config import ModelConfig
from posttrain.rlvr import distributed
from posttrain.rlvr.batch import TrainBatch, micro_batches
from posttrain.rlvr.config import LossConfig, RLTrainConfig
from posttrain.rlvr.logprobs import completion_logprobs, cp_completion_logprobs
from posttrain.rlvr.policy_loss import policy_loss
from posttrain.rollout.types import WeightUpdate
from posttrain.training import context_parallel, parallel
from posttrain.training.checkpoint import latest_checkpoint, save_checkpoint
from posttrain.training.config import LoraConfig
from posttrain.training.model import forward_precision, prepare_for_training
from posttrain.training.sharded_checkpoint import export_gathered, load_any_checkpoint, save_sharded_checkpoint

_EMBED = "model.embed_tokens.weight"  # a tied LM head is sent as its own copy of this (weight_sync.full_state_dict)


class PolicyTrainer:
    def __init__(self, model: ModelConfig, train: RLTrainConfig, lora: LoraConfig, loss: LossConfig,
                 seed: int = 0, cores: list[int] | None = None) -> None:
        """``model``: the policy's starting point (``RLVRConfig.start_model()``), loaded as the engines
        load it; ``loss``: ``RLVRConfig.loss_config()`` (Dr.GRPO's divisor already resolved); ``cores``:
        CPU cores this process keeps to (an asynchronous run's, beside the engines')."""
        if cores is not None and hasattr(os, "sched_setaffinity"):
            os.sched_setaffinity(0, cores)
        torch.manual_seed(seed)
        if train.threads:
            torch.set_num_threads(train.threads)
        self.train_cfg, self.loss_cfg, self.lora = train, loss, lora
        self.tokenizer = models.tokenizer_for(model)
        self.model = prepare_for_training(models.model_for(model), train, lora)
        self.optimizer = self._new_optimizer()
        self.steps_done = 0
        self._publisher: Any = None
        self._sender: Any = None  # rollout.sync_transport nccl/gloo: the direct weight transfer (open_transfer)
        self._filler: TrainBatch | None = None  # a row for the idle passes of FSDP ranks with less work
        self.world: parallel.Parallel | None = None  # set by join_group: one of several data-parallel workers

    def _new_optimizer(self) -> torch.optim.Optimizer:
        params = [p for p in self.model.parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.train_cfg.lr, weight_decay=self.train_cfg.weight_decay,
                                 betas=(0.9, 0.999))

    @property
    def sharded(self) -> bool:
        return parallel.is_sharded(self.model)

    def _passes(self, parts: list[Any]) -> list[Any]:
        """``parts`` padded with ``None`` to the most any rank has: under FSDP every rank must run the
        same number of forward (and backward) passes, each one gathers every block's weights."""
        if not self.sharded or self.world is None:
            return parts
        return parts + [None] * (parallel.all_max(len(parts), self.world) - len(parts))

    def _idle_pass(self, temperature: float, backward: bool) -> None:
        """A forward (and backward of zero) on a filler row: this rank's part of the collectives."""
        assert self._filler is not None
        with self._precision():
            out = completion_logprobs(self.model, self._filler, temperature, self.train_cfg.loss_chunk_size)
        if backward:
            (out.sum() * 0.0).backward()

    # ----------------------------------------------------------------- training

    def _precision(self) -> Any:
        return forward_precision(self.train_cfg.mixed_precision, str(next(self.model.parameters()).device))

    def _logprobs(self, batch: TrainBatch, temperature: float) -> torch.Tensor:
        """``[B, Tc]`` policy logprobs of ``batch``; with context parallelism each cp rank runs its share of the
        rows and gets the whole values back, with gradient through its own tokens only."""
        with self._precision():
            if self.world is not None and self.world.cp > 1:
                return cp_completion_logprobs(self.model, batch, self.world.cp_group(), temperature,
                                              self.train_cfg.loss_chunk_size)
            return completion_logprobs(self.model, batch, temperature, self.train_cfg.loss_chunk_size)

    def logprobs(self, batch: TrainBatch, temperature: float) -> torch.Tensor:
        """[B, Tc] current-policy logprobs, no grad, micro-batched."""
        if self._filler is None:
            self._set_filler(batch)
        out = torch.zeros_like(batch.rollout_logprobs)
        with torch.no_grad():
            for rows in self._passes(list(micro_batches(batch, self.train_cfg.micro_batch_tokens))):
                if rows is None:
                    self._idle_pass(temperature, backward=False)
                    continue
                sub = batch.select(rows)
                out[rows] = self._logprobs(sub, temperature).cpu()
        return out

    def _set_filler(self, batch: TrainBatch) -> None:
        if len(batch):
            self._filler = batch.select([0])

    def train_step(self, batch: TrainBatch, temperature: float) -> dict[str, float]:
        """One RL step on ``batch``: ``minibatches`` optimizer steps over shuffled rows. In a group
        every worker holds the whole batch and trains its token-balanced share of each minibatch."""
        start = time.perf_counter()
        self.model.train()
        n_mini = self.train_cfg.minibatches
        self._set_filler(batch)
        order = torch.randperm(len(batch))
        if self.world is not None:
            order = parallel.broadcast(order, self.world)  # rank 0's shuffle: ranks' RNGs may differ
        minis = [order[m::n_mini].tolist() for m in range(n_mini)]
        shares = [self._share(batch, rows) for rows in minis]
        old = self._old_logprobs(batch, [r for share in shares for r in share], temperature) if n_mini > 1 else None
        metrics: dict[str, float] = {}
        for rows, share in zip(minis, shares):
            total = int(batch.mask[rows].sum())  # the whole minibatch's tokens, the same on every worker
            share_old = old[share] if old is not None else None
            update = self._update(batch.select(share), share_old, temperature, total)
            metrics = _merge(metrics, update, weight=1 / n_mini)
        self.steps_done += 1
        metrics["time/train_s"] = time.perf_counter() - start
        return metrics

    def _share(self, batch: TrainBatch, rows: list[int]) -> list[int]:
        """This worker's rows of a minibatch (all of them outside a group)."""
        if self.world is None:
            return rows
        lengths = batch.attention_mask.sum(-1).tolist()
        return distributed.shard_rows(rows, lengths, self.world.dp_size)[self.world.dp_rank]

    def _old_logprobs(self, batch: TrainBatch, rows: list[int], temperature: float) -> torch.Tensor:
        """[B, Tc] logprobs before the first update, computed for ``rows`` (this worker's) only."""
        if len(rows) == len(batch):
            return self.logprobs(batch, temperature)
        old = torch.zeros_like(batch.rollout_logprobs)
        if rows or self.sharded:  # a sharded rank without rows still joins the others' passes
            old[rows] = self.logprobs(batch.select(rows), temperature)
        return old

    def _update(self, mini: TrainBatch, old: torch.Tensor | None, temperature: float,
                total: int) -> dict[str, float]:
        """One optimizer step. ``mini`` is this worker's share, ``total`` the token count of the
        whole minibatch. Each micro-batch's loss is a sum (of tokens, or of sequence means); the
        summed gradients are divided at the end by the tokens (or sequences) that counted over the
        whole minibatch: tokens the mismatch mask rejected are out of the denominator too."""
        if total == 0:  # every rollout masked (zero-variance groups, overlong...): nothing to learn
            return {"tokens/trained": 0.0, "train/skipped_updates": 1.0}
        token_mean = self.loss_cfg.aggregation == "token_mean"
        metrics: dict[str, float] = {}
        abs_diff_sum, abs_diff_max, counted, rejected = 0.0, 0.0, 0, 0
        parts = [rows for rows in micro_batches(mini, self.train_cfg.micro_batch_tokens)
                 if mini.select(rows).num_tokens > 0]
        for rows in self._passes(parts):
            if rows is None:
                self._idle_pass(temperature, backward=True)
                continue
            sub = mini.select(rows)
            new = self._logprobs(sub, temperature)  # cp > 1: the same loss on every cp rank, own tokens' grad
            sub_old = old[rows].to(new.device) if old is not None else new.detach()
            out = policy_loss(new, sub_old, sub.rollout_logprobs.to(new.device), sub.advantages.to(new.device),
                              sub.mask.to(new.device), self.loss_cfg, total_tokens=1.0)
            loss = out.loss  # token_mean: the token sum
            kept = int(out.mask.sum())
            rejected += sub.num_tokens - kept
            if token_mean:
                counted += kept
            else:  # this micro-batch's sequence mean back to a sum
                n_seq = int((out.mask.sum(-1) > 0).sum())
                loss, counted = loss * n_seq, counted + n_seq
            loss.backward()
            metrics = _merge(metrics, out.metrics, weight=sub.num_tokens / total)
            diff = ((sub_old - sub.rollout_logprobs.to(new.device)).abs() * sub.mask.to(new.device))
            abs_diff_sum += float(diff.sum())
            abs_diff_max = max(abs_diff_max, float(diff.max()) if diff.numel() else 0.0)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self._finish_grads(params, counted)
        grad_norm = parallel.grad_norm(params, self.train_cfg.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics.update({"mismatch/logprob_abs_mean": abs_diff_sum / total, "mismatch/logprob_abs_max": abs_diff_max,
                        "mismatch/rejected_token_share": rejected / total})
        metrics = self._across_workers(metrics)
        metrics["train/grad_norm"] = grad_norm  # computed from the summed gradients: the same on every worker
        return metrics

    def _finish_grads(self, params: list[torch.nn.Parameter], counted: int) -> None:
        """Sum the gradients over the group and divide them by ``counted`` (this worker's trained tokens,
        or sequences for sequence means) summed over the minibatch's workers."""
        if self.world is not None:
            if not self.sharded:  # FSDP summed them in backward
                parallel.all_reduce_grads(params, self.world)
            # the cp ranks of a data-parallel rank counted the same tokens
            counted = int(parallel.all_sum([counted], self.world)[0]) // self.world.cp
        if counted:  # 0: nothing counted, the gradients are zero
            for p in params:
                if p.grad is not None:
                    p.grad.div_(counted)

    def _across_workers(self, metrics: dict[str, float]) -> dict[str, float]:
        """Each worker's metrics are partial sums weighted by the whole minibatch's tokens: add them up."""
        if self.world is None:
            return metrics
        merged: dict[str, float] = {}
        # one rank per cp group: its cp peers computed the same metrics on the same rows (cp is the inner dim)
        for part in parallel.all_gather_objects(metrics, self.world)[:: self.world.cp]:
            merged = _merge(merged, part, weight=1.0)
        return merged

    # ----------------------------------------------------------------- the worker group

    def group_address(self) -> str:
        """Where this worker (rank 0) will host the group's rendezvous: ``tcp://IP:PORT``."""
        return distributed.rendezvous_address()

    def join_group(self, address: str, rank: int, size: int, timeout_s: float) -> None:
        """Become rank ``rank`` of ``size`` data-parallel workers (blocks until all have joined); with
        ``train.fsdp.enabled`` the model is sharded over them now (a fresh optimizer: no step was taken)."""
        self.world = parallel.init_tcp(address, rank, size, timeout_s, cp=self.train_cfg.context_parallel)
        if self.world.cp > 1:  # attention over the cp group (refuses layers it cannot split exactly)
            context_parallel.enable_context_parallel(self.model)
        if self.train_cfg.fsdp.enabled:
            if self.steps_done:
                raise RuntimeError("join_group with FSDP must come before the first step")
            self.model = parallel.shard_model(self.model, self.world, self.train_cfg.fsdp)
            self.optimizer = self._new_optimizer()

    def leave_group(self) -> None:
        parallel.leave()
        self.world = None

    # ----------------------------------------------------------------- sync and checkpoints

    def publish_weights(self, sync_dir: str) -> WeightUpdate:
        """Stage the current weights for the rollout engines (full, or the LoRA adapter) in
        ``sync_dir`` (/dev/shm: same host) and return the handle, tagged with this trainer's update
        count; the pool applies and releases it. Written here so the tensors never travel through the controller."""
        return dataclasses.replace(self._publish(sync_dir), policy_version=self.steps_done)

    def _publish(self, sync_dir: str) -> WeightUpdate:
        from posttrain.rollout.weight_sync import ShmPublisher, full_state_dict

        if self._publisher is None or self._publisher.root != sync_dir:
            self._publisher = ShmPublisher(sync_dir)
        with torch.no_grad():
            if self.sharded:  # every rank gathers, rank 0 writes: one tensor unsharded at a time
                return self._publisher.publish_stream(self._gathered_for_sync(), "full" if not self.lora.enabled else "lora",
                                                      self._lora_config(), write=self.world is None or self.world.main)
            if self.lora.enabled:
                from peft import get_peft_model_state_dict

                config = self.model.peft_config["default"].to_dict()
                return self._publisher.publish(get_peft_model_state_dict(self.model), "lora", config)
            return self._publisher.publish(full_state_dict(self.model), "full")

    def transfer_endpoint(self) -> tuple[str, int]:
        from posttrain.rollout.transfer import endpoint

        return endpoint()

    def open_transfer(self, transport: str, handles: list[Any], workers_per_engine: int, where: tuple[str, int],
                      dtype: str, timeout_s: float) -> None:
        """Rendezvous with a (new) engine pool for direct weight sync (``rollout.sync_transport`` nccl/ipc/gloo);
        ``dtype``: the engines' resolved dtype (``models.resolved_dtype``), the weights' wire dtype."""
        from posttrain.rollout.transfer import DirectSender

        if self.lora.enabled:
            raise ValueError("direct weight transfer sends full weights; a LoRA adapter goes through shm")
        self.close_transfer()
        self._sender = DirectSender(transport, handles, workers_per_engine, where, self.world.rank if self.world else 0,
                                    self._gathered_for_sync, self._sync_meta(),
                                    getattr(torch, dtype), timeout_s)

    def send_weights(self) -> WeightUpdate:
        """Broadcast the current weights into the engines (after :meth:`open_transfer`)."""
        if self._sender is None:
            raise RuntimeError("send_weights before open_transfer")
        return self._sender.send(self.steps_done)

    def close_transfer(self) -> None:
        if self._sender is not None:
            self._sender.close()
            self._sender = None

    def offload_optimizer(self) -> None:
        """AdamW's state to host memory (``train.offload_optimizer``: colocated engines get the GPU meanwhile)."""
        self._move_optimizer("cpu")

    def load_optimizer(self) -> None:
        """AdamW's state back beside its parameters, before the next update."""
        self._move_optimizer(None)

    def _move_optimizer(self, device: str | None) -> None:
        for param, state in self.optimizer.state.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.dim():  # moments; the step count stays put
                    state[key] = value.to(device or param.device, non_blocking=True)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def reference_logprobs(self, token_ids: list[int], start: int) -> list[float]:
        """Teacher-forced logprobs of ``token_ids[start:]`` (the engines must match them after a sync)."""
        from posttrain.rollout.weight_sync import sequence_logprobs

        self.model.eval()
        try:
            if self.sharded:  # every worker runs it (FSDP gathers in forward); no inference_mode under FSDP
                with torch.no_grad():
                    ids = torch.tensor([token_ids])
                    logps = torch.log_softmax(self.model(ids).logits.float()[0, :-1], dim=-1)  # [T-1, V]
                    return logps.gather(1, ids[0, 1:, None])[start - 1 :, 0].tolist()
            return sequence_logprobs(self.model, token_ids, start)
        finally:
            self.model.train()

    def staged_files(self, update: WeightUpdate) -> dict[str, bytes]:
        """The bytes of an update this trainer staged, for engines on other nodes."""
        from posttrain.rollout.weight_sync import staged_files

        return staged_files(update)

    def _lora_config(self) -> dict[str, Any] | None:
        return self.model.peft_config["default"].to_dict() if self.lora.enabled else None

    def _gathered_for_sync(self) -> Any:
        """(name, full tensor) in the names the engines load: the adapter's for LoRA, else the HF
        model's with the tied head sent as its own tensor (see ``weight_sync.full_state_dict``)."""
        from posttrain.training.sharded_checkpoint import gathered_weights

        if self.lora.enabled:
            from peft.utils import get_peft_model_state_dict

            # the adapter is small: gather it whole, then keep peft's names
            for name, tensor in get_peft_model_state_dict(self.model).items():
                yield name, tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
            return
        for name, tensor in gathered_weights(self.model):
            yield name, tensor
            if name == _EMBED and self._tied():
                yield "lm_head.weight", tensor.clone()

    def _sync_meta(self) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
        """``(name, dtype, shape)`` of what :meth:`_gathered_for_sync` yields for full weights, without gathering."""
        from posttrain.training.sharded_checkpoint import weight_meta

        out = []
        for name, dtype, shape in weight_meta(self.model):
            out.append((name, dtype, shape))
            if name == _EMBED and self._tied():
                out.append(("lm_head.weight", dtype, shape))
        return out

    def _tied(self) -> bool:
        """The head *is* the embedding (what the config says can differ: see ``models.head_is_tied``)."""
        return models.head_is_tied(self.model)

    def save(self, run_dir: str, step: int, state: dict[str, Any], keep_last: int) -> str:
        """A plain checkpoint (rank 0 alone: replicated weights), or with ``train.fsdp.enabled`` a sharded
        one every worker writes its shard of (the group calls this on every worker then)."""
        if self.train_cfg.fsdp.enabled:
            return str(save_sharded_checkpoint(run_dir, step, self.model, self.optimizer, None, self.tokenizer,
                                               state, keep_last, self.world or parallel.Parallel()))
        return str(save_checkpoint(run_dir, step, self.model, self.optimizer, tokenizer=self.tokenizer,
                                   state=state, keep_last=keep_last))

    def resume(self, run_dir: str) -> dict[str, Any] | None:
        """Load the newest checkpoint of ``run_dir``; its saved state, or None when there is none."""
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            return None
        state = load_any_checkpoint(ckpt, self.model, self.optimizer)  # a sharded one at any number of workers
        self.steps_done = int(state["step"])
        return state

    def export(self, folder: str) -> str:
        """Final model as an HF folder (LoRA merged into a copy) that transformers and vLLM load.

        Written atomically: ``folder`` is either absent or complete, also after a kill mid-write.
        """
        import copy

        from posttrain.atomic import atomic_dir

        if self.train_cfg.fsdp.enabled:  # every worker gathers, one tensor at a time; rank 0 writes
            return str(export_gathered(self.model, self.tokenizer, folder, self.world or parallel.Parallel()))
        model = copy.deepcopy(self.model).merge_and_unload() if self.lora.enabled else self.model
        with atomic_dir(folder) as tmp:
            model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
        return folder


def _merge(acc: dict[str, float], new: dict[str, float], weight: float) -> dict[str, float]:
    out = dict(acc)
    for k, v in new.items():
        if k.endswith("_max"):
            out[k] = max(out.get(k, v), v)
        elif k in ("tokens/trained", "mismatch/masked_sequences", "train/skipped_updates"):
            out[k] = out.get(k, 0.0) + v
        else:
            out[k] = out.get(k, 0.0) + weight * v
    return out
