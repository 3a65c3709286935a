"""The policy trainer: logprobs, the clipped policy-gradient update, weights for sync, checkpoints.

A plain class so it can be tested directly; the RLVR loop runs it as the Ray actor
``trainer-0``. One optimizer step per batch of rollouts by default (``minibatches=1``): then
the rollouts are exactly on-policy for the trainer, the "old" logprobs are the current ones
(detached) and no extra forward pass is needed; with more minibatches the old logprobs are
computed once up front and the PPO clip does its job.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from posttrain import models
from posttrain.config import ModelConfig
from posttrain.rlvr.batch import TrainBatch, micro_batches
from posttrain.rlvr.config import AlgorithmConfig, RLTrainConfig
from posttrain.rlvr.logprobs import completion_logprobs
from posttrain.rlvr.policy_loss import policy_loss
from posttrain.rollout.types import WeightUpdate
from posttrain.sft.config import LoraConfig
from posttrain.sft.model import prepare_for_training
from posttrain.training.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint


class PolicyTrainer:
    def __init__(self, model: ModelConfig, train: RLTrainConfig, lora: LoraConfig, algo: AlgorithmConfig,
                 seed: int = 0, init_from: str | None = None) -> None:
        torch.manual_seed(seed)
        if train.threads:
            torch.set_num_threads(train.threads)
        self.train_cfg, self.algo, self.lora = train, algo, lora
        self.tokenizer = models.load_tokenizer(model.name, template=model.chat_template)
        source = init_from or model.name
        self.model = prepare_for_training(models.load_model(source, dtype=model.dtype), train, lora)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay,
                                           betas=(0.9, 0.999))
        self.loss_cfg = algo.loss_config()
        self.steps_done = 0
        self._publisher: Any = None

    # ----------------------------------------------------------------- training

    def logprobs(self, batch: TrainBatch, temperature: float) -> torch.Tensor:
        """[B, Tc] current-policy logprobs, no grad, micro-batched."""
        out = torch.zeros_like(batch.rollout_logprobs)
        with torch.no_grad():
            for rows in micro_batches(batch, self.train_cfg.micro_batch_tokens):
                sub = batch.select(rows)
                out[rows] = completion_logprobs(self.model, sub, temperature, self.train_cfg.loss_chunk_size).cpu()
        return out

    def train_step(self, batch: TrainBatch, temperature: float) -> dict[str, float]:
        """One RL step on ``batch``: ``minibatches`` optimizer steps over shuffled rows."""
        start = time.perf_counter()
        self.model.train()
        n_mini = self.train_cfg.minibatches
        old = self.logprobs(batch, temperature) if n_mini > 1 else None
        order = torch.randperm(len(batch)).tolist()
        metrics: dict[str, float] = {}
        for m in range(n_mini):
            rows = order[m::n_mini]
            mini = batch.select(rows)
            mini_old = old[rows] if old is not None else None
            metrics = _merge(metrics, self._update(mini, mini_old, temperature), weight=1 / n_mini)
        self.steps_done += 1
        metrics["time/train_s"] = time.perf_counter() - start
        return metrics

    def _update(self, mini: TrainBatch, old: torch.Tensor | None, temperature: float) -> dict[str, float]:
        if mini.num_tokens == 0:  # every rollout masked (zero-variance groups, overlong...): nothing to learn
            return {"tokens/trained": 0.0, "train/skipped_updates": 1.0}
        total = mini.num_tokens
        metrics: dict[str, float] = {}
        abs_diff_sum, abs_diff_max = 0.0, 0.0
        for rows in micro_batches(mini, self.train_cfg.micro_batch_tokens):
            sub = mini.select(rows)
            if sub.num_tokens == 0:
                continue
            new = completion_logprobs(self.model, sub, temperature, self.train_cfg.loss_chunk_size)
            sub_old = old[rows].to(new.device) if old is not None else new.detach()
            out = policy_loss(new, sub_old, sub.rollout_logprobs.to(new.device), sub.advantages.to(new.device),
                              sub.mask.to(new.device), self.loss_cfg, total_tokens=total)
            out.loss.backward()
            metrics = _merge(metrics, out.metrics, weight=sub.num_tokens / total)
            diff = ((sub_old - sub.rollout_logprobs.to(new.device)).abs() * sub.mask.to(new.device))
            abs_diff_sum += float(diff.sum())
            abs_diff_max = max(abs_diff_max, float(diff.max()) if diff.numel() else 0.0)
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.train_cfg.max_grad_norm or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        metrics.update({"train/grad_norm": grad_norm, "mismatch/logprob_abs_mean": abs_diff_sum / total,
                        "mismatch/logprob_abs_max": abs_diff_max})
        return metrics

    # ----------------------------------------------------------------- sync and checkpoints

    def publish_weights(self, sync_dir: str) -> WeightUpdate:
        """Stage the current weights for the rollout engines (full, or the LoRA adapter) in
        ``sync_dir`` (/dev/shm: same host) and return the handle; the pool applies and releases it.
        Written here so the tensors never travel through the controller."""
        from posttrain.rollout.weight_sync import ShmPublisher, full_state_dict

        if self._publisher is None or self._publisher.root != sync_dir:
            self._publisher = ShmPublisher(sync_dir)
        with torch.no_grad():
            if self.lora.enabled:
                from peft import get_peft_model_state_dict

                config = self.model.peft_config["default"].to_dict()
                return self._publisher.publish(get_peft_model_state_dict(self.model), "lora", config)
            return self._publisher.publish(full_state_dict(self.model), "full")

    def reference_logprobs(self, token_ids: list[int], start: int) -> list[float]:
        """Teacher-forced logprobs of ``token_ids[start:]`` (the engines must match them after a sync)."""
        from posttrain.rollout.weight_sync import sequence_logprobs

        self.model.eval()
        try:
            return sequence_logprobs(self.model, token_ids, start)
        finally:
            self.model.train()

    def save(self, run_dir: str, step: int, state: dict[str, Any], keep_last: int) -> str:
        return str(save_checkpoint(run_dir, step, self.model, self.optimizer, tokenizer=self.tokenizer,
                                   state=state, keep_last=keep_last))

    def resume(self, run_dir: str) -> dict[str, Any] | None:
        """Load the newest checkpoint of ``run_dir``; its saved state, or None when there is none."""
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None:
            return None
        state = load_checkpoint(ckpt, self.model, self.optimizer)
        self.steps_done = int(state["step"])
        return state

    def export(self, folder: str) -> str:
        """Final model as an HF folder (LoRA merged) that transformers and vLLM load."""
        model = self.model.merge_and_unload() if self.lora.enabled else self.model
        Path(folder).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)
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
