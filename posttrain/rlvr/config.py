"""`posttrain rlvr` configuration (imports without torch).

Batch units, set once: ``run.prompts_per_step`` x ``rollout.samples_per_prompt`` rollouts per
step, trained in micro-batches of at most ``train.micro_batch_tokens`` padded tokens.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from posttrain.config import (
    JUDGE_S,
    LOGGERS_HELP,
    TRAINER_CALL_S,
    Config,
    EpisodeConfig,
    GenerationConfig,
    Logger,
    ModelConfig,
    RolloutConfig,
)
from posttrain.environments.registry import ENVIRONMENTS_HELP, EnvConfig
from posttrain.training.config import FsdpConfig, LoraConfig, MixedPrecision

Variant = Literal["nano", "grpo", "dr_grpo", "dapo"]
Baseline = Literal["loo", "mean"]
Scale = Literal["std", "none"]
Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]

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


class LossConfig(Config):
    """The clipped policy-gradient loss (:func:`posttrain.rlvr.policy_loss.policy_loss` takes this)."""

    eps_low: float = Field(0.2, ge=0.0, lt=1.0, description="clip the ratio below at 1 - eps_low")
    eps_high: float = Field(0.28, ge=0.0, description="clip the ratio above at 1 + eps_high (0.28: clip-higher)")
    kl_coef: float = Field(0.0, ge=0.0, description="k3 KL to the initial policy (recipe: 0)")
    importance_sampling: bool = Field(True, description="truncated IS between trainer and rollout logprobs")
    is_cap: float = Field(2.0, gt=0.0, description="truncation of the importance weight")
    seq_error_threshold: float | None = Field(2.0, gt=1.0, description=(
        "mask sequences whose exp(mean |trainer - rollout logprob|) exceeds this; null = never"))
    aggregation: Aggregation = Field("token_mean", description=(
        "token_mean (every token of the batch weighs the same), seq_mean_token_mean (GRPO), "
        "seq_mean_token_sum_norm (Dr.GRPO: token sums divided by sum_norm)"))
    sum_norm: int | None = Field(None, ge=1, description=(
        "seq_mean_token_sum_norm: the constant dividing each sequence's token sum; "
        "null = generation.max_new_tokens (the longest a completion can be)"))


class AlgorithmConfig(LossConfig):
    """The loss plus how rewards become advantages and which rollouts are trained on."""

    variant: Variant = Field("nano", description="preset of the other algorithm keys; keys set explicitly win")
    baseline: Baseline = Field("loo", description="loo = mean of the group's other rewards; mean = group mean")
    scale: Scale = Field("std", description="std = divide advantages by the group's std; none = raw differences")
    drop_zero_variance: bool = Field(True, description="mask groups whose rewards are all equal")
    overlong_filter: bool = Field(True, description="mask rollouts cut at max_new_tokens")

    @model_validator(mode="wrap")
    @classmethod
    def _apply_variant(cls, data: Any, handler: Any) -> Any:
        """Fill the variant's fields; they do not count as set, so that a later
        ``algorithm.variant=...`` override brings its own preset instead of keeping this one's."""
        if not isinstance(data, dict) or data.get("variant", "nano") not in VARIANTS:
            return handler(data)
        preset = {k: v for k, v in VARIANTS[data.get("variant", "nano")].items() if k not in data}
        model = handler({**preset, **data})
        model.__pydantic_fields_set__.difference_update(preset)
        return model

    def loss_config(self, max_new_tokens: int) -> LossConfig:
        """The loss's settings, Dr.GRPO's divisor resolved: ``sum_norm``, else ``max_new_tokens``."""
        fields = {name: getattr(self, name) for name in LossConfig.model_fields}
        return LossConfig(**{**fields, "sum_norm": self.sum_norm or max_new_tokens})


class RLTrainConfig(Config):
    lr: float = Field(1e-6, gt=0.0, description="AdamW learning rate (recipe: 3e-6 at 30B scale)")
    weight_decay: float = Field(0.0, ge=0.0)
    max_grad_norm: float | None = Field(1.0, gt=0.0)
    minibatches: int = Field(1, ge=1, description="optimizer steps per RL step (1 = strictly on-policy)")
    micro_batch_tokens: int = Field(8192, ge=16, description="padded tokens per forward pass")
    loss_chunk_size: int = Field(1024, ge=1, description="positions per logits chunk")
    gradient_checkpointing: bool = True
    mixed_precision: MixedPrecision = "none"
    freeze_router: bool = Field(False, description="freeze MoE routers during RL (recipe: on for MoE)")
    freeze_layers: int = Field(0, ge=0, description=(
        "freeze the embeddings and the first N decoder layers (backward stops there: a cheap fine-tune)"))
    threads: int | None = Field(None, ge=1, description="torch CPU threads of the trainer")
    workers: int = Field(1, ge=1, description=(
        "trainer workers (trainer-0..) in one torch.distributed group; each trains a token-balanced "
        "share of every batch and gradients are summed, so the update equals one worker's"))
    num_cpus: float = Field(1.0, gt=0, description="CPU cores Ray reserves per trainer worker")
    num_gpus: float = Field(0.0, ge=0, description=(
        "GPUs Ray reserves per trainer worker (1 on a GPU cluster: the worker trains on it); 0 = train on CPU"))
    context_parallel: int = Field(1, ge=1, description=(
        "split every row of the logprob and loss passes over this many trainer workers (exact attention "
        "across them, see the SFT key); must divide train.workers, the rest are data-parallel"))
    fsdp: FsdpConfig = FsdpConfig()
    offload_optimizer: bool = Field(False, description=(
        "with run.colocate: AdamW's state goes to host memory while the engines generate and comes back to "
        "train (the recipe's colocated memory saver; costs two host-device copies per step)"))

    @model_validator(mode="after")
    def _check_context_parallel(self) -> RLTrainConfig:
        if self.workers % self.context_parallel:
            raise ValueError(f"train.context_parallel={self.context_parallel} must divide train.workers "
                             f"({self.workers}): raise train.workers to a multiple of it or lower it")
        return self


class SandboxPoolConfig(Config):
    """The ``sandbox-N`` Ray actors that run untrusted programs for sandboxed environments (code)."""

    workers: int = Field(2, ge=1, description="sandbox actors (programs scored at once)")
    num_cpus: float = Field(0.25, gt=0, description=(
        "CPU Ray reserves per sandbox actor (each mostly waits on a sandboxed subprocess)"))
    call_timeout_s: float = Field(60.0, gt=0, description="a job longer than this restarts its actor (infra error)")
    wall_s: float = Field(10.0, gt=0, description="sandbox wall-clock limit of one program run")


class TimeoutsConfig(Config):
    """Deadlines (seconds) of an RL stage's calls besides the rollout engines' (``rollout.*timeout_s``)."""

    trainer_call_s: float = Field(TRAINER_CALL_S, gt=0, description=(
        "one call to the trainer workers (train step, checkpoint, weight publish) and each collective "
        "inside their torch.distributed group; past it the run stops with an error naming the worker"))
    judge_s: float = Field(JUDGE_S, gt=0, description=(
        "a group environment (a GenRM) scoring one step: every comparison of the step in one call; "
        "past it that step's groups get reward 0 and error 'timeout' (all equal: nothing is learnt from them)"))


class SolvedFilterConfig(Config):
    """The recipe's pre-pass: prompts the starting policy always solves teach nothing (every group of
    them has equal rewards), so they leave the training pool before step 1."""

    enabled: bool = Field(False, description="sample the starting policy on training prompts and drop the always-solved")
    samples: int = Field(4, ge=2, description="samples per prompt that measure its pass rate")
    max_prompts: int = Field(256, ge=1, description=(
        "prompts measured per environment (a seeded random subset; unmeasured prompts stay in the pool)"))
    max_pass_rate: float = Field(1.0, gt=0.0, le=1.0, description="drop prompts whose measured pass rate is at least this")


class RunConfig(Config):
    steps: int = Field(10, ge=1, description="RL steps")
    prompts_per_step: int = Field(8, ge=1, description="prompts per step, split over environments by weight")
    save_every: int = Field(5, ge=1, description="checkpoint every N steps (and at the end)")
    keep_last: int = Field(2, ge=1)
    eval_every: int | None = Field(None, ge=1, description=(
        "greedy eval on held-out prompts before training, every N steps and at the end; null = never"))
    eval_prompts: int = Field(50, ge=1, description="held-out prompts per environment for eval")
    eval_without_thinking: bool = Field(True, description=(
        "when generation thinks: evaluate again with thinking off (eval/<env>/no_think/...), both modes measured"))
    seed: int = 0
    score_concurrency: int = Field(8, ge=1, description="completions scored at once")
    score_timeout_s: float = Field(60.0, gt=0.0, description="per-completion scoring limit")
    curriculum: bool = Field(False, description="easy -> hard by measured pass rate within each environment")
    refill_rounds: int = Field(0, ge=0, description=(
        "dynamic sampling (DAPO), bounded: while fewer than prompts_per_step groups have differing rewards, draw "
        "prompts_per_step more prompts and roll them out, at most this many extra rounds per step; the step then "
        "trains the first prompts_per_step such groups. 0 = off"))
    solved_filter: SolvedFilterConfig = Field(SolvedFilterConfig(), description=(
        "drop training prompts the starting policy always solves (k samples each) before step 1"))
    metrics_port: int | None = Field(None, ge=1, le=65535, description=(
        "port of Ray's Prometheus metrics (ray_posttrain_*): curl http://127.0.0.1:PORT/metrics; None = a free "
        "port, logged at start"))
    loggers: list[Logger] = Field(default_factory=lambda: ["jsonl", "tensorboard"], description=LOGGERS_HELP)
    dashboard: bool = Field(True, description=(
        "start Ray's dashboard (127.0.0.1) with a local cluster; its URL is logged at start"))
    max_minutes: float | None = Field(None, gt=0, description="stop (and checkpoint) after this much wall time")
    log_samples: int = Field(4, ge=0, description=(
        "rollouts per step written as text (prompt, completion, reward) to RUN/samples.jsonl, TensorBoard and "
        "the report: each group's best and worst; 0 = none"))
    max_step_retries: int = Field(1, ge=0, description="engine restarts per generate/sync after a rollout actor died")
    colocate: bool = Field(False, description=(
        "trainer and engines share the same GPUs (train.num_gpus and rollout.gpus_per_engine fractions of one "
        "GPU): the engines sleep (vLLM sleep mode: KV cache freed, weights offloaded) while the trainer trains "
        "and wake for the weight sync and the next generation; train.offload_optimizer also moves AdamW's state "
        "off the GPU while they generate. Needs GPUs; the synchronous loop only"))
    max_staleness: int = Field(0, ge=0, description=(
        "asynchronous RL: the engines generate (and score) up to this many steps ahead while the trainer trains, "
        "so a step's rollouts may come from weights up to k updates old (the truncated IS weight and the "
        "mismatch mask correct and bound the lag); generation waits rather than sample from older weights and "
        "no finished rollout is dropped. 0 = the synchronous loop. Give trainer and engines their own cores"))
    segment_tokens: int = Field(0, ge=0, description=(
        "asynchronous RL, in-flight weight updates: the producer's generation calls stop every this many new "
        "tokens, a weight sync waiting there lands, and the unfinished completions continue under the new "
        "weights (each token keeps the logprob of the weights that sampled it; a completion that spans an "
        "update carries every version, Rollout.version_changes). Single-turn generations only: multi-turn "
        "episodes are played whole. 0 = whole completions per call (weights change only between calls). "
        "Needs run.max_staleness >= 1"))
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field("PACK", description=(
        "how the stage's actor bundles go onto nodes: PACK (few nodes), SPREAD / STRICT_SPREAD (one per node)"))


class RLVRConfig(Config):
    """GRPO on verifiable environments with vLLM rollouts (the RLVR stage)."""

    model: ModelConfig = ModelConfig()
    init_from: str | None = Field(None, description="start from this checkpoint folder instead of model.name")
    environments: list[EnvConfig] = Field(default_factory=lambda: [EnvConfig(name="math")],
                                          description=ENVIRONMENTS_HELP)
    rollout: RolloutConfig = RolloutConfig(samples_per_prompt=8)
    generation: GenerationConfig = GenerationConfig(temperature=1.0, max_new_tokens=256)
    algorithm: AlgorithmConfig = AlgorithmConfig()
    train: RLTrainConfig = RLTrainConfig()
    lora: LoraConfig = LoraConfig()
    run: RunConfig = RunConfig()
    sandbox: SandboxPoolConfig = SandboxPoolConfig()
    timeouts: TimeoutsConfig = TimeoutsConfig()
    episodes: EpisodeConfig = Field(EpisodeConfig(), description=(
        "limits of multi-turn environments' episodes (turns, tokens, tool-call timeout, episodes in flight)"))
    run_dir: str = Field("runs/rlvr", description="run folder: config, metrics, events, checkpoints")

    def loss_config(self) -> LossConfig:
        """What the trainers optimise: ``algorithm``'s loss, Dr.GRPO normalised by ``generation.max_new_tokens``."""
        return self.algorithm.loss_config(self.generation.max_new_tokens)

    def start_model(self) -> ModelConfig:
        """The policy's starting weights: ``init_from`` (a previous stage's model folder) when set, else
        ``model.name``; loaded with ``model``'s settings by the trainers and the rollout engines alike."""
        return self.model if self.init_from is None else self.model.model_copy(update={"name": self.init_from})

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
        self._check_colocation()
        if self.rollout.sync_transport != "shm" and self.lora.enabled:
            raise ValueError(f"rollout.sync_transport={self.rollout.sync_transport} broadcasts full weights; a LoRA "
                             "adapter is staged through shm: set rollout.sync_transport=shm with lora.enabled")
        if self.rollout.sync_transport in ("nccl", "ipc") and not (self.train.num_gpus and self.rollout.gpus_per_engine):
            raise ValueError(f"rollout.sync_transport={self.rollout.sync_transport} sends GPU to GPU: set train.num_gpus "
                             "and rollout.gpus_per_engine (on CPUs use gloo or shm)")
        if self.run.segment_tokens and not self.run.max_staleness:
            raise ValueError(f"run.segment_tokens={self.run.segment_tokens} lets weight updates land inside a "
                             "generation, which only an asynchronous run has: set run.max_staleness >= 1 (or leave it 0)")
        return self

    def _check_colocation(self) -> None:
        if self.train.offload_optimizer and not self.run.colocate:
            raise ValueError("train.offload_optimizer frees GPU memory for colocated engines: set run.colocate=true "
                             "(or leave it false)")
        if not self.run.colocate:
            return
        if not (self.train.num_gpus > 0 and self.rollout.gpus_per_engine > 0):
            raise ValueError("run.colocate=true shares GPUs between trainer and engines: set train.num_gpus and "
                             "rollout.gpus_per_engine (e.g. 0.5 each on one GPU); on CPUs leave it false")
        if self.run.max_staleness:
            raise ValueError("run.colocate=true runs generation and training in turn on the same GPUs: it cannot "
                             f"overlap them (run.max_staleness={self.run.max_staleness}); choose one")
