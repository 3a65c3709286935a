"""Configs of `posttrain dpo` (imports without torch)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from posttrain.config import LOGGERS_HELP, Config, Logger, ModelConfig
from posttrain.genrm.preference_data import SHIPPED
from posttrain.training.config import LoraConfig, MixedPrecision

# TRL 1.16's DPO losses (trl.DPOConfig.loss_type)
DPOLoss = Literal["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


class PreferenceDataConfig(Config):
    path: str = Field(SHIPPED, description=(
        "pairs: HelpSteer3 shape (context, response1, response2, overall_preference) or prompt/chosen/rejected; "
        "shipped set, JSONL/Parquet/CSV file, folder or hub id"))
    subset: str | None = Field(None, description="hub dataset config")
    limit: int | None = Field(None, ge=1, description="first N training pairs (None = all)")
    test_path: str | None = Field(None, description="held-out pairs (None = the test split of path)")
    test_limit: int | None = Field(100, ge=1, description="held-out pairs evaluated before and after (None = all)")
    system: str | None = Field(None, description="system message added to prompts that have none")
    on_invalid: Literal["skip", "error"] = Field("skip", description=(
        "a bad row (reported by row and field): skip it with a warning, or refuse the dataset"))
    enable_thinking: bool = Field(False, description=(
        "render the responses after an opened <think> (the chat template's thinking on); off: they are answers"))


class DPOLossConfig(Config):
    loss_type: list[DPOLoss] = Field(default_factory=lambda: ["sigmoid"], description=(
        "TRL's DPO losses: sigmoid (DPO), ipo, hinge, robust, ...; several are summed with loss_weights"))
    loss_weights: list[float] | None = Field(None, description="one per loss_type (None = all 1)")
    beta: float = Field(0.1, gt=0, description="strength of the pull toward the reference (IPO: its tau)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="robust / exo_pair: assumed share of flipped labels")
    reference: Literal["model", "free"] = Field("model", description=(
        "model = the starting model's log-probs, computed once before training (no second model in memory); "
        "free = no reference (log-ratios are the policy's own log-probs)"))

    @model_validator(mode="after")
    def _weights(self) -> DPOLossConfig:
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"loss_weights needs one weight per loss_type ({len(self.loss_type)}), "
                             f"got {len(self.loss_weights)}")
        return self


class PreferenceTrainConfig(Config):
    lr: float = Field(5e-6, gt=0)
    num_gpus: float = Field(0.0, ge=0, description=(
        "GPUs the pipeline's dpo-0 actor reserves (it trains on one if any); a torchrun launch sees its own"))
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=1, description="stop after this many steps (default: all epochs)")
    max_minutes: float | None = Field(None, gt=0, description=(
        "training time budget (from the first step, per launch): stop at the first step past it, with a "
        "checkpoint, and finish as usual (None = no limit)"))
    batch_size: int = Field(8, ge=1, description="pairs per optimizer step (over every process)")
    micro_batch_size: int = Field(2, ge=1, description="pairs per forward pass; batch_size is a multiple of it")
    max_length: int = Field(1024, ge=16, description=(
        "prompt + response tokens; DPO cuts longer pairs at the end, the RM leaves them out (TRL's trainers)"))
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    gradient_checkpointing: bool = False
    mixed_precision: MixedPrecision = "none"
    freeze_router: bool = Field(False, description="freeze MoE router (gate) weights")
    freeze_layers: int = Field(0, ge=0, description="freeze the embeddings and the first N decoder layers")
    threads: int | None = Field(None, ge=1, description="torch CPU threads (default: torch's)")
    save_every: int = Field(50, ge=1, description="checkpoint every N steps (and at the end)")
    keep_last: int = Field(2, ge=1, description="checkpoints kept")
    seed: int = 0

    @model_validator(mode="after")
    def _batches(self) -> PreferenceTrainConfig:
        if self.batch_size % self.micro_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                             f"({self.micro_batch_size})")
        return self


class PreferenceStageConfig(Config):
    """What the DPO and reward-model stages share: model, data, training, LoRA, run folder."""

    model: ModelConfig = ModelConfig()
    init_from: str | None = Field(None, description="start from this model folder instead of model.name")
    data: PreferenceDataConfig = PreferenceDataConfig()
    train: PreferenceTrainConfig = PreferenceTrainConfig()
    lora: LoraConfig = LoraConfig()
    loggers: list[Logger] = Field(default_factory=lambda: ["jsonl", "tensorboard"], description=LOGGERS_HELP)
    progress: bool = Field(True, description="show a progress bar")
    run_dir: str = Field("runs/preference", description="run folder: config, metrics, checkpoints/, model/")

    def start_model(self) -> ModelConfig:
        return self.model if self.init_from is None else self.model.model_copy(update={"name": self.init_from})


class DPOStageConfig(PreferenceStageConfig):
    """DPO on preference pairs (TRL's DPOTrainer), in our run folder."""

    dpo: DPOLossConfig = DPOLossConfig()
    run_dir: str = Field("runs/dpo", description="run folder: config, metrics, checkpoints/, model/")


class RMLossConfig(Config):
    margin_scale: float = Field(1.0, ge=0, description=(
        "Bradley-Terry with a margin: loss = -log sigmoid(r_chosen - r_rejected - margin_scale * margin), the "
        "margin being how strongly the label prefers (HelpSteer3: 1-3, Llama 2's RM recipe); 0 = plain BT"))
    center_rewards_coefficient: float | None = Field(None, ge=0, description=(
        "pull rewards toward mean 0 (TRL's center_rewards_coefficient; 0.01 is the paper's value)"))


class RMStageConfig(PreferenceStageConfig):
    """A Bradley-Terry scalar reward model on preference pairs (TRL's RewardTrainer), in our run folder."""

    rm: RMLossConfig = RMLossConfig()
    train: PreferenceTrainConfig = PreferenceTrainConfig(lr=1e-5)
    run_dir: str = Field("runs/rm", description="run folder: config, metrics, checkpoints/, model/")


class RMEvalConfig(Config):
    """Held-out pairwise accuracy of a scalar reward model (overall and per category)."""

    model: ModelConfig = Field(ModelConfig(name="runs/rm/model", chat_template="model"), description=(
        "the reward model (RUN/model, or a hub RM), read with the chat template it was trained with"))
    data: PreferenceDataConfig = PreferenceDataConfig()
    batch_size: int = Field(8, ge=1, description="sequences per forward pass")
    max_length: int = Field(1024, ge=16, description="tokens per sequence; longer ones keep their end")
