"""`posttrain rlvr` configuration (imports without torch).

Batch units, set once: ``run.prompts_per_step`` x ``rollout.samples_per_prompt`` rollouts per
step, trained in micro-batches of at most ``train.micro_batch_tokens`` padded tokens.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from posttrain.config import Config, GenerationConfig, ModelConfig, RolloutConfig
from posttrain.environments.registry import EnvConfig
from posttrain.sft.config import LoraConfig

Variant = Literal["nano", "grpo", "dr_grpo", "dapo"]

# What each named variant sets; explicit keys in the config win.
VARIANTS: dict[str, dict[str, Any]] = {
    # the reference recipe: leave-one-out baseline, std-scaled, token-level, clip-higher
    "nano": dict(baseline="loo", scale="std", aggregation="token_mean", eps_low=0.2, eps_high=0.28,
                 drop_zero_variance=True, overlong_filter=True),
    "grpo": dict(baseline="mean", scale="std", aggregation="seq_mean_token_mean", eps_low=0.2, eps_high=0.2,
                 drop_zero_variance=False, overlong_filter=False),
    "dr_grpo": dict(baseline="mean", scale="none", aggregation="seq_mean_token_sum_norm", eps_low=0.2,
                    eps_high=0.2, drop_zero_variance=False, overlong_filter=False),
    "dapo": dict(baseline="mean", scale="std", aggregation="token_mean", eps_low=0.2, eps_high=0.28,
                 drop_zero_variance=True, overlong_filter=True),
}


class AlgorithmConfig(Config):
    variant: Variant = Field("nano", description="preset of the fields below; explicit fields override it")
    baseline: Literal["loo", "mean"] = "loo"
    scale: Literal["std", "none"] = "std"
    aggregation: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    eps_low: float = Field(0.2, ge=0.0, lt=1.0)
    eps_high: float = Field(0.28, ge=0.0)
    kl_coef: float = Field(0.0, ge=0.0, description="k3 KL to the initial policy (recipe: 0)")
    importance_sampling: bool = Field(True, description="truncated IS between trainer and rollout logprobs")
    is_cap: float = Field(2.0, gt=0.0)
    seq_error_threshold: float | None = Field(2.0, gt=1.0, description=(
        "mask sequences whose exp(mean |trainer - rollout logprob|) exceeds this; null = never"))
    drop_zero_variance: bool = Field(True, description="mask groups whose rewards are all equal")
    overlong_filter: bool = Field(True, description="mask rollouts cut at max_new_tokens")

    @model_validator(mode="before")
    @classmethod
    def _apply_variant(cls, data: Any) -> Any:
        if isinstance(data, dict):
            variant = data.get("variant", "nano")
            if variant in VARIANTS:
                data = {**VARIANTS[variant], **data}
        return data

    def loss_config(self) -> Any:
        from posttrain.rlvr.policy_loss import LossConfig

        return LossConfig(eps_low=self.eps_low, eps_high=self.eps_high, kl_coef=self.kl_coef,
                          importance_sampling=self.importance_sampling, is_cap=self.is_cap,
                          seq_error_threshold=self.seq_error_threshold, aggregation=self.aggregation)


class RLTrainConfig(Config):
    lr: float = Field(1e-6, gt=0.0, description="AdamW learning rate (recipe: 3e-6 at 30B scale)")
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    minibatches: int = Field(1, ge=1, description="optimizer steps per RL step (1 = strictly on-policy)")
    micro_batch_tokens: int = Field(8192, ge=16, description="padded tokens per forward pass")
    loss_chunk_size: int = Field(1024, ge=1, description="positions per logits chunk")
    gradient_checkpointing: bool = True
    freeze_router: bool = Field(False, description="freeze MoE routers during RL (recipe: on for MoE)")
    freeze_layers: int = Field(0, ge=0, description=(
        "freeze the embeddings and the first N decoder layers (backward stops there: a cheap fine-tune)"))
    threads: int | None = Field(None, ge=1, description="torch CPU threads of the trainer")
    workers: int = Field(1, ge=1, description=(
        "trainer workers (trainer-0..) in one torch.distributed group; each trains a token-balanced "
        "share of every batch and gradients are summed, so the update equals one worker's"))
    num_cpus: float = Field(1.0, gt=0, description="CPU cores Ray reserves per trainer worker")


class SandboxPoolConfig(Config):
    """The ``sandbox-N`` Ray actors that run untrusted programs for sandboxed environments (code)."""

    workers: int = Field(2, ge=1, description="sandbox actors (programs scored at once)")
    num_cpus: float = Field(0.25, gt=0, description=(
        "CPU Ray reserves per sandbox actor (each mostly waits on a sandboxed subprocess)"))
    call_timeout_s: float = Field(60.0, gt=0, description="a job longer than this restarts its actor (infra error)")
    wall_s: float = Field(10.0, gt=0, description="sandbox wall-clock limit of one program run")


class RunConfig(Config):
    steps: int = Field(10, ge=1, description="RL steps")
    prompts_per_step: int = Field(8, ge=1, description="prompts per step, split over environments by weight")
    save_every: int = Field(5, ge=1, description="checkpoint every N steps (and at the end)")
    keep_last: int = Field(2, ge=1)
    eval_every: int | None = Field(None, ge=1, description=(
        "greedy eval on held-out prompts before training, every N steps and at the end; null = never"))
    eval_prompts: int = Field(50, ge=1, description="held-out prompts per environment for eval")
    seed: int = 0
    score_concurrency: int = Field(8, ge=1, description="completions scored at once")
    score_timeout_s: float = Field(60.0, gt=0.0, description="per-completion scoring limit")
    curriculum: bool = Field(False, description="easy -> hard by measured pass rate within each environment")
    metrics_port: int | None = Field(None, ge=1, le=65535, description=(
        "port of Ray's Prometheus metrics (ray_posttrain_*): curl http://127.0.0.1:PORT/metrics"))
    max_minutes: float | None = Field(None, gt=0, description="stop (and checkpoint) after this much wall time")
    max_step_retries: int = Field(1, ge=0, description="engine restarts per generate/sync after a rollout actor died")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field("PACK", description=(
        "how the stage's actor bundles go onto nodes: PACK (few nodes), SPREAD / STRICT_SPREAD (one per node)"))


class RLVRConfig(Config):
    """GRPO on verifiable environments with vLLM rollouts (the RLVR stage)."""

    model: ModelConfig = ModelConfig()
    init_from: str | None = Field(None, description="start from this checkpoint folder instead of model.name")
    environments: list[EnvConfig] = Field(default_factory=lambda: [EnvConfig(name="math")])
    rollout: RolloutConfig = RolloutConfig(samples_per_prompt=8)
    generation: GenerationConfig = GenerationConfig(temperature=1.0, max_new_tokens=256)
    algorithm: AlgorithmConfig = AlgorithmConfig()
    train: RLTrainConfig = RLTrainConfig()
    lora: LoraConfig = LoraConfig()
    run: RunConfig = RunConfig()
    sandbox: SandboxPoolConfig = SandboxPoolConfig()
    run_dir: str = Field("runs/rlvr", description="run folder: config, metrics, events, checkpoints")

    @model_validator(mode="after")
    def _check(self) -> RLVRConfig:
        if self.rollout.samples_per_prompt < 2:
            raise ValueError(f"rollout.samples_per_prompt must be >= 2 for GRPO (got {self.rollout.samples_per_prompt})")
        if self.generation.temperature <= 0:
            raise ValueError(f"generation.temperature must be > 0 for RL sampling (got {self.generation.temperature})")
        if not self.environments:
            raise ValueError("environments must list at least one environment")
        if self.sandbox.call_timeout_s <= self.sandbox.wall_s:
            raise ValueError(f"sandbox.call_timeout_s ({self.sandbox.call_timeout_s}) must exceed sandbox.wall_s "
                             f"({self.sandbox.wall_s}) so a stuck actor is told apart from a slow program")
        names = [e.name for e in self.environments]
        if len(set(names)) != len(names):
            raise ValueError(f"environments must have distinct names (got {names})")
        return self
