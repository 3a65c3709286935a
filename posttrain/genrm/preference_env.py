"""`genrm_preference`: train a GenRM by RL against preference labels (DESIGN.md §1).

Each sample asks the judge to compare two responses (``judge_format.judge_messages``); its answer
``{"score_1", "score_2", "ranking"}`` is read by ``parse_judgement`` and rewarded as the reference
GenRM was: ``R = -10·[format error] - |Δscore_1| - |Δscore_2| - |Δranking|``.

Rewards must lie in [0, 1] (``score_safely`` clamps), so R is mapped linearly from its range
``[-23, 0]`` onto ``[0, 1]``: the worst parsed answer loses 4 + 4 + 5 = 13 (reward 10/23) and a
format error counts as the 10-point penalty plus that maximal error (R = -23, reward 0: nothing
the model said can be scored). Each unit of error costs 1/23. The raw R and the per-field
absolute errors are logged as metrics.

``pairwise_correct`` asks whether the judge prefers the side the label prefers: 1 or 0, 0.5 when
the judge ties (ranking 3.5, which is also the fallback of an unreadable answer); pairs whose
label is a tie are left out. Field errors and pairwise figures are taken on the judgement as the
RLHF stage would use it (the fallback 3 / 3 / 3.5 for a format error); the format error rate is
reported next to them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from posttrain.environments.base import DefaultHooks, Sample, Score, ScoreKind
from posttrain.environments.data import OnInvalid
from posttrain.genrm.circular import Rule, aggregate
from posttrain.genrm.judge_format import (
    Judgement,
    PromptStyle,
    check_prompt_style,
    judge_messages,
    parse_judgement,
)
from posttrain.genrm.preference_data import (
    SHIPPED,
    PreferencePair,
    Ties,
    load_pairs,
    preferred_side,
    swapped,
)

FORMAT_PENALTY = 10.0
MAX_FIELD_ERROR = {"score_1": 4.0, "score_2": 4.0, "ranking": 5.0}  # 5 - 1 and 6 - 1
WORST_RAW_REWARD = -(FORMAT_PENALTY + sum(MAX_FIELD_ERROR.values()))  # -23
FIELDS = tuple(MAX_FIELD_ERROR)


@dataclass(frozen=True)
class Graded:
    """A judgement against its labels: per-field absolute errors, raw and normalised reward."""

    errors: dict[str, float]
    raw_reward: float
    reward: float
    pairwise_correct: float | None  # None: the label is a tie


def labels(pair: PreferencePair) -> dict[str, float]:
    return {"score_1": pair.score_1, "score_2": pair.score_2, "ranking": pair.ranking}


def pairwise_correct(gold_ranking: float, judged_ranking: float) -> float | None:
    """1 / 0 when the judge picks the label's side or not, 0.5 for a judge tie, None for a label tie."""
    want = preferred_side(gold_ranking)
    if want == 0:
        return None
    got = preferred_side(judged_ranking)
    return 0.5 if got == 0 else float(got == want)


def grade(gold: dict[str, float], judgement: Judgement) -> Graded:
    """Score one judgement against ``gold`` (keys score_1, score_2, ranking)."""
    errors = {k: abs(float(getattr(judgement, k)) - float(gold[k])) for k in FIELDS}
    raw = -sum(errors.values()) if judgement.parsed else WORST_RAW_REWARD
    return Graded(errors, raw, normalise(raw), pairwise_correct(gold["ranking"], judgement.ranking))


def normalise(raw_reward: float) -> float:
    """Raw R in [-23, 0] -> [0, 1], linear (values outside are clipped)."""
    return min(1.0, max(0.0, 1.0 - raw_reward / WORST_RAW_REWARD))


def gold_json(gold: dict[str, float]) -> str:
    """The labels as the judge should write them (integers where they are whole)."""
    return json.dumps({k: int(v) if float(v).is_integer() else v for k, v in ((k, gold[k]) for k in FIELDS)})


class PreferenceEnv(DefaultHooks):
    """Training a GenRM: judge two responses, rewarded by closeness to the gold scores.

    The pairs' order is the dataset's: ``samples`` is the same for every seed.

    Options:
        source: preference data in the HelpSteer3 shape (context, response1, response2, overall_preference);
            default: the shipped set
        test_source: held-out pairs (None = the source's test split)
        subset: hub dataset config
        size: first N train pairs (None = all)
        test_size: first N held-out pairs (None = all)
        on_invalid: a bad row: skip (counted, logged) | error
        ties: pairs without a preference: skip | midpoint
        both_orders: add every pair swapped (against position bias)
        system: judge system prompt (None = the built-in one)
        prompt_style: rubric | compact | minimal (see judge_format.judge_messages)
    """

    name = "genrm_preference"
    eval_metrics = ("pairwise_correct", "format_error")  # held-out judge quality, next to accuracy/reward

    def __init__(self, source: str = SHIPPED, test_source: str | None = None, subset: str | None = None,
                 size: int | None = None, test_size: int | None = None, on_invalid: OnInvalid = "skip",
                 ties: Ties = "skip", both_orders: bool = False, system: str | None = None,
                 prompt_style: PromptStyle = "rubric") -> None:
        for label, value in (("size", size), ("test_size", test_size)):
            if value is not None and value < 1:
                raise ValueError(f"{label} must be >= 1 or None for all pairs (got {value})")
        if on_invalid not in ("skip", "error"):
            raise ValueError(f"on_invalid must be skip or error (got {on_invalid!r})")
        if ties not in ("skip", "midpoint"):
            raise ValueError(f"ties must be skip or midpoint (got {ties!r})")
        self.source, self.test_source, self.subset = source, test_source, subset
        self.sizes = {"train": size, "test": test_size}
        self.on_invalid, self.ties, self.both_orders, self.system = on_invalid, ties, both_orders, system
        self.prompt_style = check_prompt_style(prompt_style)
        self._pairs: dict[str, list[PreferencePair]] = {}

    def labelled(self, split: str) -> list[PreferencePair]:
        """The labelled pairs of ``split`` as the dataset gives them (loaded once, never swapped)."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test' (got {split!r})")
        if split not in self._pairs:
            source = self.test_source if split == "test" and self.test_source else self.source
            pairs = load_pairs(source, split, subset=self.subset, on_invalid=self.on_invalid, ties=self.ties)
            self._pairs[split] = pairs[: self.sizes[split]]
        return self._pairs[split]

    def pairs(self, split: str) -> list[PreferencePair]:
        """The pairs the samples of ``split`` ask about: with ``both_orders`` each pair, then it swapped."""
        pairs = self.labelled(split)
        return [p for pair in pairs for p in (pair, swapped(pair))] if self.both_orders else list(pairs)

    def samples(self, split: str, seed: int) -> list[Sample]:
        return [Sample(id=f"{split}/{pair.id}", answer=labels(pair),
                       messages=judge_messages(pair.context, pair.response_1, pair.response_2, system=self.system,
                                               style=self.prompt_style),
                       info={"pair_id": pair.id, "category": pair.category, "scores_derived": pair.scores_derived})
                for pair in self.pairs(split)]

    @staticmethod
    def gold_answer(sample: Sample) -> str:
        return gold_json(sample.answer)

    async def score(self, sample: Sample, completion: str) -> Score:
        judgement = parse_judgement(completion)
        graded = grade(sample.answer, judgement)
        metrics = {"format_error": float(not judgement.parsed), "raw_reward": graded.raw_reward}
        metrics.update({f"abs_error_{k}": v for k, v in graded.errors.items()})
        if graded.pairwise_correct is not None:
            metrics["pairwise_correct"] = graded.pairwise_correct
        if not judgement.parsed:
            return Score(graded.reward, metrics, f"format: {judgement.error}", ScoreKind.INVALID)
        return Score(graded.reward, metrics)


def order_averaged_accuracy(pairs: Sequence[PreferencePair], judgements: Sequence[Judgement],
                            rule: Rule = "margin") -> float:
    """Pairwise accuracy when each pair is decided by BOTH its judgements, as RLHF with
    ``both_orders`` decides it: ``pairs`` alternate pair, swapped pair; the two responses' rewards
    come from :func:`posttrain.genrm.circular.aggregate` over the two calls (equal rewards: 0.5).
    A judge that answers the same whatever the content scores exactly 0.5 here."""
    if len(pairs) % 2 or len(pairs) != len(judgements):
        raise ValueError(f"need pair, swapped pair, ... with one judgement each (got {len(pairs)} pairs, "
                         f"{len(judgements)} judgements)")
    right = []
    for k in range(0, len(pairs), 2):
        want = preferred_side(pairs[k].ranking)
        if want == 0:
            continue
        first, second = aggregate(2, [(0, 1), (1, 0)], judgements[k:k + 2], rule)
        right.append(0.5 if first == second else float((first > second) == (want == 1)))
    return sum(right) / len(right) if right else 0.0


def preference_metrics(pairs: Sequence[PreferencePair], judgements: Sequence[Judgement],
                       both_orders: bool = False) -> dict[str, float]:
    """Judge quality on labelled pairs (for ``posttrain genrm eval``).

    ``pairwise_accuracy`` over the judgements that were readable, of pairs whose label prefers a side
    (judge ties count 0.5), also per pair category (``pairwise_accuracy/<category>``: the dataset's
    domain or generator category); absent when no judgement was readable: an unreadable verdict
    decides nothing. ``n_judgements`` (one per pair and order), ``n_readable`` and ``n_decided`` (readable,
    label with a side) say what the figure rests on. ``chance_accuracy`` (0.5, a coin flip) and
    ``first_side_accuracy`` (always answering "response 1", which exposes position bias in the data)
    for reference; mean absolute error per field; ``mean_reward`` / ``mean_raw_reward`` as the
    environment gives them. ``both_orders`` (pairs alternate pair, swapped pair) adds
    ``pairwise_accuracy_both_orders``: each pair decided by its two judgements together, as RLHF
    with ``both_orders`` reads them -- an unreadable verdict is RLHF's neutral fallback there, so a
    judge that cannot answer scores chance (0.5), the reward signal it would give
    (see :func:`order_averaged_accuracy`).
    """
    if len(pairs) != len(judgements):
        raise ValueError(f"{len(pairs)} pairs but {len(judgements)} judgements")
    if not pairs:
        raise ValueError("preference_metrics needs at least one pair")
    graded = [grade(labels(p), j) for p, j in zip(pairs, judgements)]
    readable = [j.parsed for j in judgements]
    decided = [g.pairwise_correct for g, ok in zip(graded, readable) if ok and g.pairwise_correct is not None]
    first = [float(preferred_side(p.ranking) == 1) for p in pairs if preferred_side(p.ranking) != 0]
    n = len(pairs)
    out: dict[str, float] = {
        "n_judgements": float(n),
        "n_readable": float(sum(readable)),
        "n_decided": float(len(decided)),
        "chance_accuracy": 0.5,
        "first_side_accuracy": sum(first) / len(first) if first else 0.0,
        "format_error_rate": sum(not ok for ok in readable) / n,
        "mean_reward": sum(g.reward for g in graded) / n,
        "mean_raw_reward": sum(g.raw_reward for g in graded) / n,
    }
    if decided:
        out["pairwise_accuracy"] = sum(decided) / len(decided)
    out.update({f"mae_{k}": sum(g.errors[k] for g in graded) / n for k in FIELDS})
    if both_orders:
        out["pairwise_accuracy_both_orders"] = order_averaged_accuracy(pairs, judgements)
    by_category: dict[str, list[float]] = {}
    for pair, g, ok in zip(pairs, graded, readable):
        if pair.category and ok and g.pairwise_correct is not None:
            by_category.setdefault(pair.category, []).append(g.pairwise_correct)
    out.update({f"pairwise_accuracy/{c}": sum(v) / len(v) for c, v in sorted(by_category.items())})
    return out
