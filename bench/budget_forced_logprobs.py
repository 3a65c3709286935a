"""Behaviour logprobs of budget-forced tokens: the engine's sampled logprobs vs the same ids rescored.

    OMP_NUM_THREADS=2 .venv/bin/python bench/budget_forced_logprobs.py MODEL [--budget 16] [--prompts 16]

Samples 4 completions per held-out ``math`` prompt at temperature 1 (the rescoring's) with thinking on and a
reasoning budget (vLLM, the budget's logits processor), rescores the same token ids teacher-forced on the same
engine, and prints the
largest |sampled - rescored| logprob per rollout, split into rollouts cut at the budget and the others.
With ``rollout.logprobs=processed`` (the default) a forced ``</think>`` comes back with its processed logprob
(about 0: the processor left it the only choice), so cut rollouts show a diff of many nats; the engine
marks those tokens ``loss_mask`` 0, and the last line compares only the tokens that train.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--budget", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=16)
    args = parser.parse_args()

    from posttrain.config import GenerationConfig, ModelConfig, RolloutConfig
    from posttrain.environments.math_env import MathEnv
    from posttrain.rollout.engine import RolloutEngine

    env = MathEnv(levels=[1, 2, 3], size=args.prompts, test_size=args.prompts)
    prompts = [s.messages for s in env.samples("test", 0)]
    env.close()
    engine = RolloutEngine(ModelConfig(name=args.model), RolloutConfig(max_model_len=1024, kv_cache_gib=1))
    try:
        gen = GenerationConfig(max_new_tokens=96, temperature=1.0, enable_thinking=True,  # rescoring is at T=1
                               reasoning_budget=args.budget, seed=1)
        rollouts = [r for group in engine.generate(prompts, gen, n=4) for r in group]
        rescored = engine.score([r.prompt_ids + r.token_ids for r in rollouts], [len(r.prompt_ids) for r in rollouts])
    finally:
        engine.shutdown()
    worst: dict[bool, list[float]] = {True: [], False: []}
    trained: list[float] = []  # the same, on the tokens that train (loss_mask 1: the forced tag left out)
    for r, lp in zip(rollouts, rescored):
        diffs = [abs(a - b) for a, b in zip(r.logprobs, lp)]
        worst[r.reasoning_tokens >= args.budget].append(max(diffs, default=0.0))
        mask = r.loss_mask or [1] * len(diffs)
        trained.append(max((d for d, m in zip(diffs, mask) if m), default=0.0))
    rows = ((worst[True], "cut at the budget"), (worst[False], "closed by the model"),
            (trained, "all, trained tokens"))
    for values, label in rows:
        values = sorted(values, reverse=True)
        top = f"max {values[0]:.3g}, median {values[len(values) // 2]:.3g}" if values else "-"
        print(f"{label:22s} {len(values):4d} rollouts   |sampled - rescored| logprob per rollout: {top}")


if __name__ == "__main__":
    main()
