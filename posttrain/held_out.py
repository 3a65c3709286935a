"""Held-out evaluation of any model on any environments, outside a training run (`posttrain eval`).

The same code the stages evaluate with (:func:`posttrain.rlvr.evaluate.evaluate_modes`, scoring as
in training): greedy accuracy with thinking and budget as ``generation`` sets them and, with
``without_thinking``, again with thinking off; ``pass_k`` adds pass@k from ``samples`` sampled
answers per prompt (the unbiased estimator of Chen et al. 2021: 1 - C(n-c, k) / C(n, k) for c correct
of n). The pipeline's evaluation around SFT is this function too.

No sandbox actors run here: programs are scored from this process under ``sandbox_wall_s``.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Any

from pydantic import Field, model_validator

from posttrain.config import JUDGE_S, Config, EpisodeConfig, GenerationConfig, ModelConfig, RolloutConfig
from posttrain.environments.registry import ENVIRONMENTS_HELP, EnvConfig

if TYPE_CHECKING:
    from posttrain.rlvr.config import RLVRConfig

log = logging.getLogger(__name__)


class EvalConfig(Config):
    """`posttrain eval`: a model, its environments' test splits, and how to answer them."""

    model: ModelConfig = ModelConfig()
    environments: list[EnvConfig] = Field(default_factory=lambda: [EnvConfig(name="math")],
                                          description=ENVIRONMENTS_HELP)
    rollout: RolloutConfig = RolloutConfig(samples_per_prompt=1)
    generation: GenerationConfig = GenerationConfig(temperature=1.0, max_new_tokens=256)
    episodes: EpisodeConfig = EpisodeConfig()
    prompts: int = Field(100, ge=1, description="test prompts per environment (the first of its test split)")
    seed: int = Field(0, description="environments' sample order and the sampling seed")
    without_thinking: bool = Field(True, description="when generation thinks, also evaluate with thinking off")
    pass_k: list[int] = Field(default_factory=list, description="k values of pass@k, e.g. [1, 4] (empty = greedy only)")
    samples: int | None = Field(None, ge=1, description="answers sampled per prompt for pass@k (default: max(pass_k))")
    sandbox_wall_s: float = Field(10.0, gt=0, description="sandbox wall-clock limit of one program run")
    score_concurrency: int = Field(8, ge=1, description="completions scored at once")
    score_timeout_s: float = Field(60.0, gt=0, description="per-completion scoring limit")
    judge_s: float = Field(JUDGE_S, gt=0, description="a group environment (a GenRM) scoring one batch")
    out: str | None = Field(None, description="also write the results to this JSON file")

    @classmethod
    def of_stage(cls, stage: RLVRConfig, model: str, prompts: int) -> EvalConfig:
        """The evaluation an RL stage runs (its environments, engines, generation and scoring limits) of ``model``."""
        return cls(model=stage.model.model_copy(update={"name": model}), environments=stage.environments,
                   rollout=stage.rollout, generation=stage.generation, episodes=stage.episodes, prompts=prompts,
                   seed=stage.run.seed, without_thinking=stage.run.eval_without_thinking,
                   sandbox_wall_s=stage.sandbox.wall_s, score_concurrency=stage.run.score_concurrency,
                   score_timeout_s=stage.run.score_timeout_s, judge_s=stage.timeouts.judge_s)

    @model_validator(mode="after")
    def _check_pass_k(self) -> EvalConfig:
        if any(k < 1 for k in self.pass_k):
            raise ValueError(f"pass_k values must be >= 1 (got {self.pass_k})")
        if self.pass_k and (self.samples or max(self.pass_k)) < max(self.pass_k):
            raise ValueError(f"samples={self.samples} is fewer than the largest pass_k ({max(self.pass_k)})")
        if self.pass_k and self.generation.temperature <= 0:
            raise ValueError("pass@k needs sampled answers: set generation.temperature > 0")
        return self


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt with ``c`` correct answers of ``n`` sampled."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples (got {n})")
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def run_eval(cfg: EvalConfig) -> dict[str, float]:
    """Start one rollout pool on ``cfg.model`` and measure every environment's test split."""
    from posttrain.environments.base import StageResources
    from posttrain.environments.registry import opened
    from posttrain.rlvr.evaluate import evaluate_modes
    from posttrain.rollout.pool import RolloutPool
    from posttrain.verifiers.sandbox import Limits
    from posttrain.verifiers.service import LocalRunner

    limits = {"concurrency": cfg.score_concurrency, "timeout": cfg.score_timeout_s, "group_timeout": cfg.judge_s,
              "episodes": cfg.episodes}
    with opened(cfg.environments) as envs:
        for env in envs.values():
            env.start(StageResources(code_runner=LocalRunner(Limits(wall_s=cfg.sandbox_wall_s))))
        pool = RolloutPool(cfg.model, cfg.rollout, name_prefix="eval")
        try:
            result = evaluate_modes(pool, envs, cfg.generation, cfg.prompts, cfg.seed, cfg.without_thinking, **limits)
            if cfg.pass_k:
                result.update(_pass_at_k(pool, envs, cfg, limits))
        finally:
            pool.shutdown()
    return result


def _pass_at_k(engines: Any, envs: dict[str, Any], cfg: EvalConfig, limits: dict[str, Any]) -> dict[str, float]:
    """``eval/<env>/pass@<k>``: ``cfg.samples`` answers per test prompt at ``generation.temperature``."""
    from posttrain.rlvr.evaluate import solved
    from posttrain.rlvr.scoring import play_and_score

    n = cfg.samples or max(cfg.pass_k)
    out: dict[str, float] = {}
    for key, env in envs.items():
        samples = list(env.samples("test", cfg.seed))[: cfg.prompts]
        if not samples:
            continue
        played = play_and_score({key: env}, [(key, s) for s in samples], engines, cfg.generation, n, **limits)
        correct = [sum(map(solved, played.scores[i * n:(i + 1) * n])) for i in range(len(samples))]
        for k in cfg.pass_k:
            out[f"eval/{env.name}/pass@{k}"] = sum(pass_at_k(n, c, k) for c in correct) / len(correct)
        out[f"eval/{env.name}/samples"] = float(n)
    return out


def format_table(result: dict[str, float]) -> str:
    """``metric  value`` lines, counts (prompts, samples) last."""
    counts = ("/prompts", "/samples")
    keys = sorted(result, key=lambda k: (k.endswith(counts), k))
    width = max((len(k) for k in keys), default=0)
    return "\n".join(f"{k:{width}s}  {result[k]:.4g}" for k in keys)
