"""`posttrain sft` configuration (imports without torch).

Batch units, set once: ``train.micro_batch_tokens`` (tokens one forward pass holds: a pack,
or padded rows) and ``train.micro_batches_per_step`` (global, split over data-parallel
processes). Tokens per step and steps per epoch are derived and logged, never set.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from posttrain.config import LOGGERS_HELP, Config, Logger, ModelConfig
from posttrain.training.config import FsdpConfig, LoraConfig, MixedPrecision


class DataConfig(Config):
    path: str = Field("posttrain:arith_reasoning", description=(
        "local .jsonl/.json/.parquet file or folder, a hub dataset id, or posttrain:NAME for a "
        "dataset shipped in posttrain/data"))
    split: str = Field("train", description="split to read (hub datasets and folders)")
    messages_field: str = Field("messages", description="column holding the chat messages")
    limit: int | None = Field(None, ge=1, description="use only the first N rows (smoke runs)")
    reasoning_off_share: float = Field(0.10, ge=0.0, le=1.0, description=(
        "share of samples with reasoning removed, rendered with thinking off (recipe: 10%)"))
    budget_cut_share: float = Field(0.03, ge=0.0, le=1.0, description=(
        "share of samples with reasoning cut at a token budget, final answer kept (recipe: 3%)"))
    budget_fraction: tuple[float, float] = Field((0.1, 0.9), description=(
        "a cut keeps this fraction range of the reasoning tokens; the kept count is the budget"))
    overlong: Literal["drop", "error"] = Field("drop", description=(
        "samples longer than train.micro_batch_tokens: drop (counted in the log) or stop"))
    seed: int = Field(0, description="seed of the transforms (fixed per row, independent of order)")

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        lo, hi = self.budget_fraction
        if not 0.0 < lo <= hi < 1.0:
            raise ValueError(f"data.budget_fraction must satisfy 0 < lo <= hi < 1 (got {self.budget_fraction})")
        if self.reasoning_off_share + self.budget_cut_share > 1.0:
            raise ValueError("data.reasoning_off_share + data.budget_cut_share must be <= 1 "
                             f"(got {self.reasoning_off_share} + {self.budget_cut_share})")
        return self


class TrainConfig(Config):
    micro_batch_tokens: int = Field(4096, ge=16, description="tokens per forward pass (pack size); up to 262144")
    num_gpus: float = Field(0.0, ge=0, description=(
        "GPUs the pipeline's sft-0 actor reserves (it trains on one if any); a torchrun launch sees its own"))
    micro_batches_per_step: int = Field(1, ge=1, description="global micro-batches per optimizer step")
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (default: all epochs)")
    lr: float = Field(2e-5, gt=0.0)
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0, description="clip; null = no clipping")
    packing: Literal["auto", "pack", "pad"] = Field("auto", description=(
        "pack = documents share a row, isolated by position ids (exact for attention models); "
        "pad = one document per row; auto = pack when exact for the model, else pad "
        "(Mamba layers in transformers ignore seq_idx and would leak state across documents)"))
    gradient_checkpointing: bool = True
    mixed_precision: MixedPrecision = "none"
    loss_chunk_size: int = Field(2048, ge=1, description="positions per logits chunk of the loss")
    freeze_router: bool = Field(False, description="freeze MoE router (gate) weights")
    freeze_layers: int = Field(0, ge=0, description=(
        "freeze the embeddings and the first N decoder layers (backward stops there: a cheap fine-tune)"))
    seed: int = Field(0, description="seed of the data order and of training")
    log_every: int = Field(1, ge=1)
    save_every: int | None = Field(None, ge=1, description="checkpoint every N steps (and at the end)")
    keep_last: int = Field(2, ge=1, description="checkpoints kept")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's)")
    context_parallel: int = Field(1, ge=1, description=(
        "split every micro-batch's rows over this many processes (2N load-balanced chunks, exact causal "
        "attention over all-gathered K/V, global RoPE positions, loss over the global token count); must "
        "divide the number of processes, the rest are data-parallel (composes with fsdp: dp_shard x cp). "
        "Llama/Qwen2-style attention models and NemotronH; other recurrent layers are refused"))
    fsdp: FsdpConfig = FsdpConfig()


class SFTConfig(Config):
    """Supervised fine-tuning of a chat model on message datasets."""

    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    lora: LoraConfig = LoraConfig()
    run_dir: str = Field("runs/sft", description="run folder: config, TensorBoard events, checkpoints, final model")
    progress: bool = Field(True, description="show a progress bar")
    loggers: list[Logger] = Field(default_factory=lambda: ["jsonl", "tensorboard"], description=LOGGERS_HELP)
