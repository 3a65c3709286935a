"""`genrm`: a generative reward model as an environment -- the RLHF stage's reward.

The rollouts of one prompt are compared pair by pair by the GenRM (``circular``: i with i+1,
N judge calls per group), every comparison of the step in ONE batched judge call; the
judgements become one reward per rollout (:func:`posttrain.genrm.circular.aggregate`), then
group-relative length control. With ``both_orders`` every comparison is judged in both orders
(2N calls); with ``judge.scoring=expected`` the judge's written integers become expectations
under its token distribution (:mod:`posttrain.genrm.expected_score`). Rewards are mapped
linearly from [0, 6] onto [0, 1] (the loop's reward range; advantages are group-relative, so the
scale does not matter); the raw GenRM reward is logged as ``env/genrm/raw_reward``.

A group of ONE rollout (greedy held-out evaluation) is compared with the prompt's reference
response instead: reward 1 / 0.5 / 0 for a win / tie / loss, so ``eval/genrm/accuracy`` is
the policy's win rate against the reference and ``eval/genrm/reward`` counts ties as halves;
``eval/genrm/reference_margin`` is the mean of (policy's GenRM reward - reference's): a finer
measure of the same thing when the judge's verdicts are expectations.

A judge call that fails (outage, timeout, crashed engine) is not a verdict: the rollouts it
compared are scored as infra errors (counted in ``env/genrm/errors/infra`` and
``verifier/errors``, not trained), and a step in which every call failed is logged as a warning.
The shuffle RNG and the judge's seed counter are checkpointed (:meth:`GenRMEnv.state_dict`), so
a resumed run judges exactly as an uninterrupted one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import Field

from posttrain.config import Config, ModelConfig, RolloutConfig
from posttrain.environments.base import (
    Completion,
    DefaultHooks,
    Sample,
    Score,
    ScoreKind,
    StageResources,
    restore_rng,
    rng_state,
)
from posttrain.genrm.backends import (
    JudgeBackend,
    JudgeCall,
    JudgeConfig,
    judge_backend,
    summarize,
)
from posttrain.genrm.circular import Mode, Rule, aggregate, orient, pairs, position_bias
from posttrain.genrm.expected_score import judge_verdicts
from posttrain.errors import ServiceError
from posttrain.genrm.judge import Conversation
from posttrain.genrm.judge_format import Judgement, judge_messages
from posttrain.genrm.length_control import LengthControl, apply_length_control
from posttrain.genrm.preference_data import SHIPPED, preference_prompts
from posttrain.orchestration.placement import bundle

REWARD_RANGE = (0.0, 6.0)  # raw GenRM rewards (1-5 scores, ranking shifts, length terms) -> [0, 1]

log = logging.getLogger(__name__)


class LengthControlConfig(Config):
    reasoning_coef: float = Field(0.3, ge=0, description="zero-sum penalty weight on reasoning length (0 = off)")
    answer_coef: float = Field(0.35, ge=0, description="zero-sum penalty weight on answer length (0 = off)")
    short_bonus: float = Field(0.5, ge=0, description="bonus of the shortest response among the top (Nano: 0.5)")
    top_fraction: float = Field(0.2, gt=0, le=1, description="the top share of the group the bonus looks at")


class GenRMOptions(Config):
    """Options of the ``genrm`` environment (``environments: [{name: genrm, options: {...}}]``)."""

    source: str = Field(SHIPPED, description="prompts: preference data (HelpSteer3 shape: context, response1/2)")
    test_source: str | None = Field(None, description="held-out prompts file (a folder/hub id has its own split)")
    size: int | None = Field(None, ge=1, description="train prompts kept (None = all)")
    test_size: int | None = Field(None, ge=1, description="held-out prompts kept (None = all)")
    judge: JudgeConfig = JudgeConfig()
    judge_rollout: RolloutConfig = Field(
        RolloutConfig(max_model_len=2048), description="engines of a local GenRM (named genrm-0, ...)")
    mode: Mode = Field("circular", description="circular (N calls, the recipe), k_neighbours, all_pairs")
    k: int = Field(2, ge=1, description="k_neighbours: comparisons per rollout and side")
    rule: Rule = Field("margin", description="aggregation: margin (default: won the benchmark), reference, joint")
    shuffle: bool = Field(True, description="random order of the two responses in each call (position bias)")
    both_orders: bool = Field(False, description=(
        "judge every comparison twice, once in each order (2x the calls): cancels a judge's position bias "
        "per pair, not only on average (shuffle is then moot); small judges need it "
        "(see bench/genrm_expected_score.py)"))
    length_control: LengthControlConfig = LengthControlConfig()
    max_failed_steps: int | None = Field(3, ge=1, description=(
        "stop the run (an error naming the judge) after this many steps in a row in which every judge call "
        "failed; None = warn and go on (those rollouts are not trained)"))
    seed: int = Field(0, description="order shuffles and pairings")


class GenRMEnv(DefaultHooks):
    name = "genrm"
    Options = GenRMOptions  # what `options` may hold (checked by the registry, listed by `env show`)
    eval_metrics = ("reference_margin",)  # held-out: mean GenRM reward minus the reference's (finer than wins)

    def __init__(self, backend: JudgeBackend | None = None, **options: Any) -> None:
        """``backend``: a judge to use as it is (tests, a shared judge); else :meth:`start` builds ``judge``'s."""
        self.opts = GenRMOptions.model_validate(options)
        if self.opts.judge.backend == "local" and not self.opts.judge.model:
            raise ValueError("genrm: judge.model (a hub id, model folder or built-in name of the GenRM) is needed "
                             "for judge.backend=local; or set judge.backend=openai and judge.base_url")
        lc = self.opts.length_control
        self.length = LengthControl(lc.reasoning_coef, lc.answer_coef, lc.short_bonus, lc.top_fraction)
        self._rng = random.Random(self.opts.seed)
        self._pool: Any = None
        self._backend: JudgeBackend | None = backend
        self._given_backend = backend is not None
        self._judge_state: dict[str, Any] | None = None  # loaded before start(): applied by start()
        self._failed_steps = 0  # steps in a row whose judge calls all failed

    # ----------------------------------------------------------------- data

    def samples(self, split: str, seed: int) -> list[Sample]:
        o = self.opts
        return preference_prompts(o.test_source if split == "test" and o.test_source else o.source, split,
                                  o.test_size if split == "test" else o.size)

    # ----------------------------------------------------------------- actors

    def roles(self) -> dict[str, list[dict[str, float]]]:
        """Ray bundles this environment needs: one per local GenRM engine (none with a given backend)."""
        if self.opts.judge.backend != "local" or self._given_backend:
            return {}
        r = self.opts.judge_rollout
        return {"genrm": [bundle(r.cpus_per_engine, r.gpus_per_engine)] * r.num_engines}

    def start(self, resources: StageResources) -> None:
        """Start the judge (local: GenRM engines ``genrm-0..`` in the stage's placement group)."""
        if self._backend is None:
            self._backend = self._start_backend(resources.placement)
            if hasattr(self._backend, "probe"):  # a served judge: refuse to start against one that is down
                self._backend.probe()
        self._apply_judge_state()

    def _start_backend(self, placement: Any) -> JudgeBackend:
        if self.opts.judge.backend == "local":
            from posttrain.rollout.pool import RolloutPool

            self._pool = RolloutPool(ModelConfig(name=self.opts.judge.model), self.opts.judge_rollout,
                                     name_prefix="genrm", placement=placement)
        return judge_backend(self.opts.judge, pool=self._pool)

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
        if self._pool is not None:
            self._pool.shutdown()
        self._backend = self._pool = None

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to judge as an uninterrupted one (JSON): the shuffle RNG, the judge's state."""
        judge = self._backend.state_dict() if self._backend is not None else self._judge_state
        return {"rng": rng_state(self._rng), "judge": judge}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore_rng(self._rng, state["rng"])
        self._judge_state = state.get("judge")
        if self._backend is not None:
            self._apply_judge_state()

    def _apply_judge_state(self) -> None:
        if self._judge_state is not None and self._backend is not None:
            self._backend.load_state_dict(self._judge_state)
            self._judge_state = None

    # ----------------------------------------------------------------- scoring

    async def score(self, sample: Sample, completion: str) -> Score:
        """One completion alone: judged against the reference (as in evaluation)."""
        return (await self.score_groups([sample], [[Completion(completion)]]))[0][0]

    async def score_groups(self, samples: Sequence[Sample], groups: Sequence[Sequence[Completion]]) -> list[list[Score]]:
        plans = [self._plan(s, g) for s, g in zip(samples, groups)]
        batch = [conv for plan in plans for conv in plan.convs]
        if self._backend is None:  # scored outside a stage (tests, env check): a judge of its own
            self.start(StageResources())
        calls = await asyncio.to_thread(self._backend.complete, batch) if batch else []  # type: ignore[union-attr]
        self._count_outage(calls)
        judgements, expected_rate = judge_verdicts(calls, self.opts.judge.scoring)
        step = _step_metrics(calls, judgements, [p for plan in plans for p in plan.shown])
        if self.opts.judge.scoring == "expected":
            step["expected_values_rate"] = expected_rate
        out, at = [], 0
        for plan, group in zip(plans, groups):
            k = len(plan.convs)
            verdicts = Verdicts(judgements[at:at + k], calls[at:at + k], step)
            if isinstance(plan, VersusReference):
                out.append([self._reference_score(plan, verdicts)])
            else:
                out.append(self._group_scores(plan, group, verdicts))
            at += k
        return out

    def _count_outage(self, calls: list[JudgeCall]) -> None:
        """A step whose judge calls all failed trains nothing: warned each time, and after
        ``max_failed_steps`` such steps in a row the run stops with a :class:`ServiceError`."""
        if not calls or any(c.ok for c in calls):
            self._failed_steps = 0
            return
        self._failed_steps += 1
        codes = ", ".join(f"{code} x{n}" for code, n in Counter(c.error or "unknown" for c in calls).most_common())
        where = self.opts.judge.base_url or f"engines genrm-* ({self.opts.judge.model})"
        message = (f"genrm: every judge call of this step failed ({len(calls)} calls: {codes}; judge: {where}); "
                   f"no rollout of it is trained. {self._failed_steps} such step(s) in a row. Last error: "
                   f"{calls[0].detail[:200]}")
        limit = self.opts.max_failed_steps
        if limit is not None and self._failed_steps >= limit:
            raise ServiceError(f"{message}. Stopped after {limit} (genrm option max_failed_steps); "
                               "resume once the judge answers")
        log.warning("%s. Is the judge up?", message)

    def _plan(self, sample: Sample, group: Sequence[Completion]) -> WithinGroup | VersusReference:
        """The comparisons of one group: oriented index pairs and their judge conversations."""
        answers = [c.answer for c in group]
        if len(group) == 1:  # evaluation: against the reference response (index 1)
            reference = (sample.answer or {}).get("reference") if isinstance(sample.answer, dict) else None
            if not reference:
                return VersusReference([], [])
            answers, shown = answers + [reference], [(0, 1)]
        else:
            shown = pairs(len(group), self.opts.mode, self.opts.k)
        if self.opts.both_orders:
            shown = [*shown, *((b, a) for a, b in shown)]
        elif self.opts.shuffle:
            shown = orient(shown, self._rng)
        convs = [judge_messages(sample.messages, answers[a], answers[b], style=self.opts.judge.prompt_style)
                 for a, b in shown]
        return VersusReference(shown, convs) if len(group) == 1 else WithinGroup(shown, convs)

    def _reference_score(self, plan: VersusReference, verdicts: Verdicts) -> Score:
        if not plan.shown:
            return Score.failed(ScoreKind.ENV_ERROR, "the sample has no reference response", verdicts.step)
        mine, ref = aggregate(2, plan.shown, verdicts.judgements, self.opts.rule)
        win = 1.0 if mine > ref else 0.5 if mine == ref else 0.0
        metrics = {**verdicts.step, "raw_reward": mine, "reference_reward": ref, "reference_margin": mine - ref}
        if (outage := verdicts.outage(plan.shown)).get(0):
            return Score(win, metrics, outage[0], ScoreKind.INFRA)
        unread = next((j.error for j in verdicts.judgements if not j.parsed), None)
        if unread is not None:  # the judge answered but not readably: no verdict on the rollout
            return Score(win, metrics, f"judge output unreadable: {unread}", ScoreKind.ENV_ERROR)
        return Score(win, metrics)

    def _group_scores(self, plan: WithinGroup, group: Sequence[Completion], verdicts: Verdicts) -> list[Score]:
        raw = aggregate(len(group), plan.shown, verdicts.judgements, self.opts.rule)
        adjusted = apply_length_control(raw, [c.reasoning_tokens for c in group],
                                        [c.answer_tokens for c in group], self.length)
        lo, hi = REWARD_RANGE
        failed = sum(not j.parsed for j in verdicts.judgements) / max(len(verdicts.judgements), 1)
        outage = verdicts.outage(plan.shown)
        # length terms can push a raw reward out of the range: clamped, and counted (env/genrm/reward_clamped)
        return [Score(min(1.0, max(0.0, (r - lo) / (hi - lo))),
                      {**verdicts.step, "raw_reward": r, "judge_reward": j, "group_parse_failures": failed,
                       "reward_clamped": float(not lo <= r <= hi)},
                      outage.get(i), ScoreKind.INFRA if i in outage else ScoreKind.OK)
                for i, (r, j) in enumerate(zip(adjusted, raw))]


@dataclass(frozen=True)
class WithinGroup:
    """The judge calls comparing a group's rollouts: ``convs[k]`` shows ``shown[k]`` = (first, second)."""

    shown: list[tuple[int, int]]
    convs: list[Conversation]


@dataclass(frozen=True)
class VersusReference:
    """Greedy evaluation: the one rollout (index 0) against the prompt's reference (index 1); no calls
    when the sample has no reference."""

    shown: list[tuple[int, int]]
    convs: list[Conversation]


@dataclass(frozen=True)
class Verdicts:
    """What the judge said about one group: a judgement per call (failed calls: the fallback), the
    calls themselves, and the step's judge statistics."""

    judgements: list[Judgement]
    calls: list[JudgeCall]
    step: dict[str, float]

    def outage(self, shown: Sequence[tuple[int, int]]) -> dict[int, str]:
        """The detail of an infra error per answer that a failed call compared (its reward is no verdict)."""
        out: dict[int, str] = {}
        for pair, call in zip(shown, self.calls):
            if not call.ok:
                for i in pair:
                    out.setdefault(i, f"judge call failed ({call.error}): {call.detail[:200]}")
        return out




def _step_metrics(calls: list[JudgeCall], judgements: list[Judgement], shown: list[tuple[int, int]]) -> dict[str, float]:
    """Judge statistics of the whole step, attached to every score (they average to themselves)."""
    out = {k.removeprefix("genrm/"): v for k, v in summarize(calls).items() if not k.startswith("genrm/errors/")}
    out["parse_failure_rate"] = sum(not j.parsed for j in judgements) / len(judgements) if judgements else 0.0
    bias = position_bias(shown, judgements) if judgements else math.nan
    if not math.isnan(bias):
        out["position1_preference"] = bias
    return out
