"""Does a small GenRM know more than its written verdict says? Written vs expected scores, side by side.

One greedy pass over the held-out pairs, each judged in both orders, with the top-20 tokens at
every position (the written verdicts are the same with or without them). Each verdict is then
read two ways: as written (``judge.scoring=generate``) and as expectations under the judge's
digit distributions (``judge.scoring=expected``). For both, pairwise accuracy is given per
judgement (as ``posttrain genrm eval`` reports it) and per pair from its two judgements together
(as RLHF with ``both_orders: true`` decides it; a content-blind judge scores exactly 0.5).

    python bench/genrm_expected_score.py runs/genrm-smollm2/warmup/model --prompt-style compact
"""

from __future__ import annotations

import argparse
import time

from posttrain.config import GenerationConfig, ModelConfig, RolloutConfig
from posttrain.genrm.backends import call_of
from posttrain.genrm.expected_score import judge_verdicts
from posttrain.genrm.judge_format import judge_messages
from posttrain.genrm.preference_data import load_pairs, swapped
from posttrain.genrm.preference_env import preference_metrics
from posttrain.rollout.engine import RolloutEngine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="GenRM: model folder, hub id or built-in name")
    p.add_argument("--prompt-style", default="compact", choices=["rubric", "compact"])
    p.add_argument("--source", default="posttrain:preferences", help="preference data (default: shipped set)")
    p.add_argument("--split", default="test")
    p.add_argument("--pairs", type=int, default=None, help="first N pairs (default: all)")
    p.add_argument("--max-tokens", type=int, default=32, help="judge completion budget")
    args = p.parse_args()
    pairs = [q for pair in load_pairs(args.source, args.split, limit=args.pairs) for q in (pair, swapped(pair))]
    engine = RolloutEngine(ModelConfig(name=args.model), RolloutConfig(max_model_len=2048, kv_cache_gib=2))
    gen = GenerationConfig(max_new_tokens=args.max_tokens, temperature=0.0, enable_thinking=False, top_logprobs=20)
    start = time.perf_counter()
    try:
        groups = engine.generate([judge_messages(q.context, q.response_1, q.response_2, style=args.prompt_style)
                                  for q in pairs], gen, n=1)
    finally:
        engine.shutdown()
    seconds = time.perf_counter() - start
    calls = [call_of(g) for g in groups]
    print(f"{len(pairs) // 2} {args.split} pairs x both orders, {len(calls)} greedy judgements in {seconds:.0f} s")
    print(f"{'scoring':10} {'per judgement':>14} {'per pair (both orders)':>23} {'format errors':>14}")
    for scoring in ("generate", "expected"):
        judgements, _ = judge_verdicts(calls, scoring)
        m = preference_metrics(pairs, judgements, both_orders=True)
        print(f"{scoring:10} {m['pairwise_accuracy']:14.4f} {m['pairwise_accuracy_both_orders']:23.4f} "
              f"{m['format_error_rate']:14.4f}")
    print(f"{'chance':10} {0.5:14.4f} {0.5:23.4f}")


if __name__ == "__main__":
    main()
