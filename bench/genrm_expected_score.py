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
from posttrain.genrm.config import GenRMEvalConfig
from posttrain.genrm.preference_data import load_pairs
from posttrain.genrm.train import judge_calls, verdict_metrics


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="GenRM: model folder, hub id or built-in name")
    p.add_argument("--prompt-style", default="compact", choices=["rubric", "compact", "minimal"])
    p.add_argument("--source", default="posttrain:preferences", help="preference data (default: shipped set)")
    p.add_argument("--split", default="test")
    p.add_argument("--pairs", type=int, default=None, help="first N pairs (default: all)")
    p.add_argument("--max-tokens", type=int, default=32, help="judge completion budget")
    args = p.parse_args()
    cfg = GenRMEvalConfig(model=ModelConfig(name=args.model), both_orders=True, prompt_style=args.prompt_style,
                          scoring="expected", rollout=RolloutConfig(max_model_len=2048, kv_cache_gib=2),
                          generation=GenerationConfig(max_new_tokens=args.max_tokens, temperature=0.0,
                                                      enable_thinking=False))
    start = time.perf_counter()
    shown, calls = judge_calls(cfg, load_pairs(args.source, args.split, limit=args.pairs))
    seconds = time.perf_counter() - start
    print(f"{len(shown) // 2} {args.split} pairs x both orders, {len(calls)} greedy judgements in {seconds:.0f} s")
    print(f"{'scoring':10} {'per judgement':>14} {'per pair (both orders)':>23} {'format errors':>14}")
    for scoring in ("generate", "expected"):
        m = verdict_metrics(cfg, shown, calls, scoring)
        print(f"{scoring:10} {m.get('pairwise_accuracy', float('nan')):14.4f} "
              f"{m['pairwise_accuracy_both_orders']:23.4f} {m['format_error_rate']:14.4f}")
    print(f"{'chance':10} {0.5:14.4f} {0.5:23.4f}")


if __name__ == "__main__":
    main()
