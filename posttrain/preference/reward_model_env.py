"""`reward_model`: a scalar (Bradley-Terry) reward model as an environment -- RLHF's reward without a judge.

Every rollout of the step is scored in ONE batched call to the reward model, which runs on its own
Ray actor ``reward_model-0`` (in the stage's placement group, on the dashboard), one forward pass per
rollout: N calls for N rollouts, like the GenRM's circle, but no generation. The scored
conversation is the prompt plus the rollout's answer, rendered by the RM's chat template as in its
training (:class:`~posttrain.preference.reward_model.RewardScorer`).

Rewards are **group-normalised**: within a prompt's rollouts, ``sigmoid((s - mean) / std)`` -- the
loop's [0, 1] range, the ranking kept, and a reward model's offset and scale (arbitrary in
Bradley-Terry) gone, so it mixes with verifiable environments on equal terms. ``normalize=none``
gives ``sigmoid(s)``. The raw score is logged as ``env/reward_model/score``.

A group of ONE rollout (greedy held-out evaluation) is compared with the prompt's reference
response, as the ``genrm`` environment does: reward 1 / 0.5 / 0 for a higher / equal / lower score,
so ``eval/reward_model/accuracy`` is the win rate against the reference and
``eval/reward_model/reference_margin`` the mean score difference. A failed RM call (the actor died
or timed out) scores the step's rollouts as infra errors: counted, not trained, never a crash.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

from pydantic import Field

from posttrain.config import Config, ModelConfig
from posttrain.environments.base import Completion, DefaultHooks, Sample, Score, ScoreKind, StageResources
from posttrain.genrm.preference_data import SHIPPED, preference_prompts

log = logging.getLogger(__name__)
ROLE = "reward_model"
Scorer = Callable[[list[list[dict[str, str]]]], list[float]]


class RewardModelOptions(Config):
    """Options of the ``reward_model`` environment (``environments: [{name: reward_model, options: {...}}]``)."""

    model: str = Field(..., description="the reward model: RUN/model of `posttrain rm train`, or a hub id")
    source: str = Field(SHIPPED, description="prompts: preference data (HelpSteer3 shape: context, response1/2)")
    test_source: str | None = Field(None, description="held-out prompts file (a folder/hub id has its own split)")
    size: int | None = Field(None, ge=1, description="train prompts kept (None = all)")
    test_size: int | None = Field(None, ge=1, description="held-out prompts kept (None = all)")
    normalize: Literal["group", "none"] = Field("group", description=(
        "group: sigmoid of the score's z-score within the prompt's rollouts; none: sigmoid of the raw score"))
    enable_thinking: bool = Field(False, description="render scored conversations with the thinking template on")
    batch_size: int = Field(8, ge=1, description="rollouts per forward pass")
    max_length: int = Field(1024, ge=16, description="tokens scored per rollout; longer ones keep their end")
    cpus: float = Field(1.0, gt=0, description="CPUs of the reward_model-0 actor (its bundle)")
    gpus: float = Field(0.0, ge=0, description="GPUs of the reward_model-0 actor (0: CPU)")
    timeout_s: float = Field(600.0, gt=0, description="a scoring call that takes longer is an infra error")


class RewardModelEnv(DefaultHooks):
    name = "reward_model"
    Options = RewardModelOptions
    eval_metrics = ("reference_margin",)  # held-out: mean RM score minus the reference's

    def __init__(self, scorer: Scorer | None = None, **options: Any) -> None:
        """``scorer``: score conversations with this instead of an actor (tests, a shared model)."""
        self.opts = RewardModelOptions.model_validate(options)
        self._scorer = scorer
        self._actor: Any = None

    def samples(self, split: str, seed: int) -> list[Sample]:
        o = self.opts
        return preference_prompts(o.test_source if split == "test" and o.test_source else o.source, split,
                                  o.test_size if split == "test" else o.size)

    # ----------------------------------------------------------------- the actor

    def roles(self) -> dict[str, list[dict[str, float]]]:
        if self._scorer is not None:
            return {}
        return {ROLE: [{"CPU": self.opts.cpus, "GPU": self.opts.gpus}]}

    def start(self, resources: StageResources) -> None:
        """Start ``reward_model-0`` (in the stage's placement group when it reserved one) and load the model."""
        if self._scorer is not None or self._actor is not None:
            return
        from posttrain.orchestration import cluster

        cluster.init_ray()
        slot = resources.placement.slot(ROLE, 0) if resources.placement is not None else None
        threads = max(1, int(self.opts.cpus))
        self._actor = cluster.start_actor(
            RewardModelActor, f"{ROLE}-0", self.opts.model, self.opts.batch_size, self.opts.max_length, threads,
            num_cpus=self.opts.cpus, num_gpus=self.opts.gpus, placement=slot,
            env={"OMP_NUM_THREADS": str(threads)})
        cluster.gather([self._actor.ready.remote()], [f"{ROLE}-0"], self.opts.timeout_s, "loading the reward model")

    def close(self) -> None:
        if self._actor is not None:
            from posttrain.orchestration import cluster

            cluster.kill_actor(self._actor)
        self._actor = None

    def _score(self, conversations: list[list[dict[str, str]]]) -> list[float]:
        if self._scorer is not None:
            return self._scorer(conversations)
        if self._actor is None:  # scored outside a stage (env check): an actor of its own
            self.start(StageResources())
        from posttrain.orchestration import cluster

        ref = self._actor.score.remote(conversations, self.opts.enable_thinking)
        return cluster.gather([ref], [f"{ROLE}-0"], self.opts.timeout_s, "scoring")[0]

    # ----------------------------------------------------------------- scoring

    async def score(self, sample: Sample, completion: str) -> Score:
        return (await self.score_groups([sample], [[Completion(completion)]]))[0][0]

    async def score_groups(self, samples: Sequence[Sample],
                           groups: Sequence[Sequence[Completion]]) -> list[list[Score]]:
        convs, spans = [], []
        for sample, group in zip(samples, groups):
            answers = [c.answer for c in group]
            if len(group) == 1:  # evaluation: the rollout, then the reference it is compared with
                answers.append(_reference(sample) or "")
            spans.append((len(convs), len(answers)))
            convs += [[*sample.messages, {"role": "assistant", "content": a}] for a in answers]
        try:
            scores = await asyncio.to_thread(self._score, convs) if convs else []
            if len(scores) != len(convs) or not all(isinstance(s, float) and math.isfinite(s) for s in scores):
                raise ValueError(f"the reward model returned {len(scores)} scores for {len(convs)} rollouts "
                                 "(or a non-finite one)")
        except Exception as exc:  # noqa: BLE001 - an RM outage is counted per rollout, not a crashed step
            detail = f"reward model call failed: {type(exc).__name__}: {str(exc)[:200]}"
            log.warning("%s", detail)
            return [[Score.failed(ScoreKind.INFRA, detail) for _ in group] for group in groups]
        out = []
        for sample, group, (at, k) in zip(samples, groups, spans):
            mine = scores[at:at + k]
            if len(group) == 1:
                out.append([self._versus_reference(sample, mine)])
            else:
                out.append([Score(r, {"score": s}) for r, s in zip(self._rewards(mine), mine)])
        return out

    def _rewards(self, scores: list[float]) -> list[float]:
        if self.opts.normalize == "none":
            return [_sigmoid(s) for s in scores]
        mean = sum(scores) / len(scores)
        std = math.sqrt(sum((s - mean) ** 2 for s in scores) / len(scores))
        return [_sigmoid((s - mean) / std) if std > 1e-8 else 0.5 for s in scores]

    def _versus_reference(self, sample: Sample, scores: list[float]) -> Score:
        mine, ref = scores
        if not _reference(sample):
            return Score.failed(ScoreKind.ENV_ERROR, "the sample has no reference response", {"score": mine})
        win = 1.0 if mine > ref else 0.5 if mine == ref else 0.0
        return Score(win, {"score": mine, "reference_score": ref, "reference_margin": mine - ref})


def _reference(sample: Sample) -> str | None:
    return sample.answer.get("reference") if isinstance(sample.answer, dict) else None


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


class RewardModelActor:
    """``reward_model-0``: the reward model loaded once, scoring batches of conversations."""

    def __init__(self, model: str, batch_size: int, max_length: int, threads: int) -> None:
        import torch

        from posttrain.preference.reward_model import RewardScorer

        torch.set_num_threads(threads)
        # the chat template saved with the RM: what it was trained on (ours for `posttrain rm train`)
        self.scorer = RewardScorer.load(ModelConfig(name=model, chat_template="model"), batch_size=batch_size,
                                        max_length=max_length)

    def ready(self) -> bool:
        return True

    def score(self, conversations: list[list[dict[str, str]]], enable_thinking: bool = False) -> list[float]:
        return self.scorer.score(conversations, enable_thinking=enable_thinking)
