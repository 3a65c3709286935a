"""Training and evaluating custom GenRMs.

``train``: an optional SFT warm-up on the gold judgements (the answer format is learnt in
minutes), then RL on the ``genrm_preference`` environment, whose reward compares the model's
judgement with the human labels -- the RLVR loop as it is, with ``stage="genrm"``.
``evaluate``: greedy judgements of held-out pairs (both orders by default, which cancels a
judge's position bias) -> pairwise accuracy (per judgement, and per pair from both its
judgements), score errors, format errors; ``scoring=expected`` reads the verdicts as expectations.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from posttrain.atomic import atomic_write_text
from posttrain.config import MAX_TOP_LOGPROBS
from posttrain.environments.registry import opened
from posttrain.errors import DataError
from posttrain.genrm.backends import call_of
from posttrain.genrm.config import GenRMEvalConfig, GenRMTrainConfig, trained_prompt_style
from posttrain.rlvr.config import RLVRConfig

log = logging.getLogger(__name__)


def train(cfg: GenRMTrainConfig, resume: bool = False) -> dict[str, float]:
    """Warm-up (if enabled and not done yet), then the RL run in ``cfg.run_dir``; returns its last metrics."""
    from posttrain.rlvr.loop import main

    init_from = cfg.init_from
    if cfg.judge_eval.enabled:
        log_judge_eval(cfg, init_from or cfg.model.name, before=True)
    if cfg.warmup.enabled:
        init_from = warmup(cfg)
    fields = {k: getattr(cfg, k) for k in RLVRConfig.model_fields}
    last = main(RLVRConfig(**{**fields, "init_from": init_from}), resume=resume, stage="genrm")
    if cfg.judge_eval.enabled:
        log_judge_eval(cfg, str(Path(cfg.run_dir) / "model"), before=False)
    return last


JUDGE_EVAL = "eval/genrm_judge/"
# the same before and after, or counts: left out of the before/after rows
CONSTANT = ("n_pairs", "n_judgements", "n_decided", "chance_accuracy", "first_side_accuracy", "mean_raw_reward")


def log_judge_eval(cfg: GenRMTrainConfig, model: str, before: bool) -> None:
    """``cfg.judge_eval`` of ``model`` into the run's metrics (``eval/genrm_judge/...``): at step 0 before
    training, at the last step after; skipped when a resumed run has it already."""
    from posttrain.metrics import log_once
    from posttrain.report_data import last_step, logged_at

    step = 0 if before else last_step(cfg.run_dir)
    if logged_at(cfg.run_dir, step, JUDGE_EVAL):
        return
    with opened([e for e in cfg.environments if e.name == "genrm_preference"]) as envs:
        pairs = [p for env in envs.values() for p in env.labelled("test")]
    if not pairs:
        log.warning("judge_eval: no genrm_preference environment with test pairs; skipped")
        return
    metrics = judge_quality(judge_eval_config(cfg, model), pairs[: cfg.judge_eval.limit])
    shown = {k: v for k, v in metrics.items() if "/" not in k and k not in CONSTANT}
    shown["prompts"] = metrics["n_judgements"]  # judge calls made (a count: the report leaves it out of before/after)
    log_once(cfg.run_dir, "genrm", step, {JUDGE_EVAL + k: v for k, v in shown.items()}, cfg.run.loggers)
    log.info("GenRM judge eval (%s, step %d): %d of %d verdicts readable; pairwise accuracy %s per readable "
             "verdict, %.3f both orders (as RLHF reads them)", "before" if before else "after", step,
             metrics["n_readable"], metrics["n_judgements"], _figure(metrics.get("pairwise_accuracy")),
             metrics["pairwise_accuracy_both_orders"])


def _figure(value: float | None) -> str:
    return "n/a (no readable verdict)" if value is None else f"{value:.3f}"


def judge_eval_config(cfg: GenRMTrainConfig, model: str) -> GenRMEvalConfig:
    """The stage's judge, judging as its environments prompt and RLHF reads it (greedy)."""
    return GenRMEvalConfig(model=cfg.model.model_copy(update={"name": model}), both_orders=True,
                           prompt_style=trained_prompt_style(cfg.environments), scoring=cfg.judge_eval.scoring,
                           rollout=cfg.rollout,
                           generation=cfg.generation.model_copy(update={"temperature": 0.0}))


def warmup(cfg: GenRMTrainConfig) -> str:
    """SFT on every training sample's gold judgement; returns the model folder (reused when present)."""
    from posttrain.sft.config import DataConfig, SFTConfig
    from posttrain.sft.train import train as sft_train

    folder = Path(cfg.run_dir) / "warmup"
    if (folder / "model" / "config.json").is_file():
        log.info("warm-up already done: %s", folder / "model")
        return str(folder / "model")
    rows = []
    with opened(cfg.environments) as envs:
        for env in envs.values():
            for sample in list(env.samples("train", cfg.run.seed))[: cfg.warmup.limit]:
                answer = env.gold_answer(sample)
                if answer:
                    rows.append({"messages": [*sample.messages, {"role": "assistant", "content": answer}]})
    if not rows:
        raise DataError("warmup.enabled but no environment sample has a gold answer to learn from")
    data_file = folder / "data.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(data_file, "".join(json.dumps(r) + "\n" for r in rows))
    sft = SFTConfig(model=cfg.model, train=cfg.warmup.train, lora=cfg.lora, run_dir=str(folder),
                    data=DataConfig(path=str(data_file), reasoning_off_share=0.0, budget_cut_share=0.0))
    log.info("GenRM warm-up: SFT on %d gold judgements", len(rows))
    return str(sft_train(sft, resume=True) / "model")


def evaluate(cfg: GenRMEvalConfig) -> dict[str, float]:
    """Judge held-out pairs with ``cfg.model`` (greedy) and compare with the labels."""
    from posttrain.genrm.preference_data import load_pairs

    pairs = load_pairs(cfg.source, cfg.split, limit=cfg.limit)
    if not pairs:
        raise DataError(f"no preference pairs in {cfg.source!r} split {cfg.split!r}")
    return judge_quality(cfg, pairs)


def judge_quality(cfg: GenRMEvalConfig, pairs: list[Any]) -> dict[str, float]:
    """``cfg.model`` judges ``pairs`` (greedy; both orders when ``cfg.both_orders``) against their labels."""
    shown, calls = judge_calls(cfg, pairs)
    return verdict_metrics(cfg, shown, calls, cfg.scoring)


def judge_calls(cfg: GenRMEvalConfig, pairs: list[Any]) -> tuple[list[Any], list[Any]]:
    """(the pairs as shown to the judge -- each followed by its swapped twin when ``cfg.both_orders`` --,
    one judge call each). With ``scoring=expected`` the calls carry top log-probs, so they can be read
    both ways (:func:`verdict_metrics`)."""
    from posttrain.genrm.judge_format import judge_messages
    from posttrain.genrm.preference_data import swapped

    if cfg.both_orders:
        pairs = [p for pair in pairs for p in (pair, swapped(pair))]
    generation = cfg.generation
    if cfg.scoring == "expected":
        generation = generation.model_copy(update={"top_logprobs": MAX_TOP_LOGPROBS})
    prompts = [judge_messages(p.context, p.response_1, p.response_2, style=cfg.prompt_style) for p in pairs]
    if cfg.judge is not None:
        return pairs, _served_calls(cfg, generation, prompts)
    engine = _judge_engine(cfg)
    try:
        return pairs, [call_of(g) for g in engine.generate(prompts, generation, n=1)]
    finally:
        engine.shutdown()


def verdict_metrics(cfg: GenRMEvalConfig, shown: list[Any], calls: list[Any], scoring: str) -> dict[str, float]:
    """Judge quality of ``calls`` on the ``shown`` pairs, the verdicts read as written or as expectations."""
    from posttrain.genrm.expected_score import judge_verdicts
    from posttrain.genrm.preference_env import preference_metrics

    judgements, expected_rate = judge_verdicts(calls, scoring)  # type: ignore[arg-type]
    metrics: dict[str, Any] = preference_metrics(shown, judgements, both_orders=cfg.both_orders)
    metrics["n_pairs"] = float(len(shown) // 2 if cfg.both_orders else len(shown))
    metrics["failed_call_rate"] = sum(not c.ok for c in calls) / len(calls)
    if scoring == "expected":
        metrics["expected_values_rate"] = expected_rate
    return metrics


def _served_calls(cfg: GenRMEvalConfig, generation: Any, prompts: list[Any]) -> list[Any]:
    """The judge calls of a served judge (``cfg.judge``), probed first, sampling as ``generation`` says."""
    from posttrain.genrm.openai_backend import OpenAIJudge

    assert cfg.judge is not None
    judge = cfg.judge.model_copy(update={
        "temperature": generation.temperature, "top_p": generation.top_p, "max_tokens": generation.max_new_tokens,
        "scoring": cfg.scoring, "seed": generation.seed, "prompt_style": cfg.prompt_style})
    with OpenAIJudge(judge) as served:
        served.probe()
        return served.complete(prompts)


def _judge_engine(cfg: GenRMEvalConfig) -> Any:
    """Inside a Ray job (the pipeline's GenRM stage) the judge runs as the actor ``judge-eval-0``, seen on
    the dashboard and gone with it; alone (``posttrain genrm eval``) it runs in this process."""
    import ray

    if ray.is_initialized():
        from posttrain.rollout.pool import RolloutPool

        return RolloutPool(cfg.model, cfg.rollout.model_copy(update={"num_engines": 1}), name_prefix="judge-eval")
    from posttrain.rollout.engine import RolloutEngine

    return RolloutEngine(cfg.model, cfg.rollout)
