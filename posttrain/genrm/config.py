"""Configs of the GenRM commands: `posttrain rlhf`, `posttrain genrm train`, `posttrain genrm eval`.

RLHF and GenRM training ARE the RLVR loop (DESIGN.md §2: the reward model is just another
environment), so their configs are the RLVR config with other defaults plus what only they need.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from posttrain.config import MAX_TOP_LOGPROBS, Config, GenerationConfig, ModelConfig, RolloutConfig
from posttrain.environments.registry import ENVIRONMENTS_HELP, EnvConfig
from posttrain.errors import ConfigError
from posttrain.genrm.judge import JudgeConfig
from posttrain.genrm.judge_format import PromptStyle, Scoring
from posttrain.rlvr.config import RLVRConfig
from posttrain.sft.config import TrainConfig as SFTTrainConfig


class RLHFConfig(RLVRConfig):
    """The RLVR loop with a GenRM environment (``genrm``), optionally mixed with verifiable ones."""

    environments: list[EnvConfig] = Field(
        default_factory=lambda: [EnvConfig(name="genrm", options={"judge": {"model": "smollm2-135m-instruct"}})],
        description=ENVIRONMENTS_HELP)
    run_dir: str = Field("runs/rlhf", description="run folder: config, metrics, events, checkpoints")


class WarmupConfig(Config):
    """Optional SFT on the gold judgements before RL (teaches the answer format fast)."""

    enabled: bool = Field(False, description="run the SFT warm-up first; RL then starts from its model")
    limit: int | None = Field(None, ge=1, description="warm-up pairs used (None = all training pairs)")
    train: SFTTrainConfig = SFTTrainConfig(epochs=1, lr=2e-5, micro_batch_tokens=4096, gradient_checkpointing=False)


class JudgeEvalConfig(Config):
    """The judge's held-out quality before and after training, as RLHF will use it: every test pair of
    the ``genrm_preference`` environments judged greedily in both orders, each pair decided by its two
    verdicts together (``eval/genrm_judge/pairwise_accuracy_both_orders``, chance 0.5)."""

    enabled: bool = Field(True, description="judge the test pairs with the starting model and the trained one")
    limit: int | None = Field(None, ge=1, description="test pairs judged (None = all the environment's)")
    scoring: Scoring = Field("expected", description="generate | expected, as judge.scoring in RLHF")


class GenRMTrainConfig(RLVRConfig):
    """Turn a chat model into a GenRM: RL on ``genrm_preference`` (reward from the human labels)."""

    environments: list[EnvConfig] = Field(default_factory=lambda: [EnvConfig(name="genrm_preference")],
                                          description=ENVIRONMENTS_HELP)
    warmup: WarmupConfig = WarmupConfig()
    judge_eval: JudgeEvalConfig = JudgeEvalConfig()
    run_dir: str = Field("runs/genrm", description="run folder: warmup/ (SFT) and the RL run's files")


def trained_prompt_style(environments: list[EnvConfig]) -> PromptStyle:
    """The judge prompt style a GenRM trains with (its ``genrm_preference`` environments must agree)."""
    styles = {e.options.get("prompt_style", "rubric") for e in environments if e.name == "genrm_preference"}
    if len(styles) > 1:
        raise ConfigError(f"genrm: the genrm_preference environments train different prompt styles {sorted(styles)}")
    return styles.pop() if styles else "rubric"


class GenRMEvalConfig(Config):
    """Pairwise accuracy and score errors of a GenRM on held-out preference pairs."""

    model: ModelConfig = ModelConfig()
    source: str = Field("posttrain:preferences", description="preference data (shipped set, file, folder, hub id)")
    split: str = "test"
    limit: int | None = Field(None, ge=1, description="pairs evaluated (None = all)")
    both_orders: bool = Field(True, description="judge every pair in both orders (cancels position bias)")
    prompt_style: PromptStyle = Field("rubric", description=(
        "judge prompt the GenRM was trained with: rubric | compact | minimal"))
    scoring: Scoring = Field("generate", description=(
        "generate = the written values; expected = each written integer replaced by its expectation under "
        f"the judge's top-{MAX_TOP_LOGPROBS} token distribution (as judge.scoring)"))
    generation: GenerationConfig = GenerationConfig(max_new_tokens=96, temperature=0.0, enable_thinking=False)
    rollout: RolloutConfig = RolloutConfig(max_model_len=2048)
    judge: JudgeConfig | None = Field(None, description=(
        "a served judge instead of model: judge.backend=openai judge.base_url=http://HOST:8000/v1 [judge.model=NAME]; "
        "its connection keys as in the genrm environment, sampling from generation"))

    @model_validator(mode="after")
    def _served(self) -> GenRMEvalConfig:
        if self.judge is not None and self.judge.backend != "openai":
            raise ValueError("judge is for a served judge (judge.backend=openai, judge.base_url=...); "
                             "a local GenRM is model.name")
        return self
