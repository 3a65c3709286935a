"""Rollout benchmark: one model, one prompt set, one sampling setting, three paths, one run.

(a) raw vLLM ``LLM.generate`` in this process, (b) our ``RolloutPool`` (vLLM in a Ray actor),
(c) HF ``generate``; then weight-sync time and bytes/s for a tiny model and the main model.
(a) and (b) do identical work (same token ids, sampling parameters and per-sample seeds) and are
timed in alternation; each path reports its fastest run.
Every path gets one CPU core (``--cores``) so the ratios compare engines, not thread counts.

    python bench/rollout.py                      # SmolLM2-135M, 16 prompts x 4 samples, 128 tokens
    python bench/rollout.py --prompts 4 --max-new-tokens 32   # quick look
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TOPICS = ["the moon", "prime numbers", "a red bicycle", "rain in spring", "sorting a list", "tea", "the ocean",
          "binary search", "a lost key", "autumn leaves", "gravity", "a small robot", "coffee", "mountains",
          "the number seven", "a quiet library"]


def best_of(repeats: int, run: Any) -> tuple[int, float]:
    """(tokens, seconds) of the fastest of ``repeats`` calls of ``run() -> tokens``."""
    best: tuple[int, float] | None = None
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = run()
        seconds = time.perf_counter() - start
        if best is None or tokens / seconds > best[0] / best[1]:
            best = (tokens, seconds)
    assert best is not None
    return best


def prompts(count: int) -> list[list[dict[str, str]]]:
    return [[{"role": "system", "content": "You are a helpful AI assistant."},
             {"role": "user", "content": f"Write a few sentences about {TOPICS[i % len(TOPICS)]}."}]
            for i in range(count)]


def bench_hf(model_dir: str, msgs: list, gen: Any, n: int, cores: int, repeats: int) -> tuple[int, float]:
    """(c) HF generate on the same prompts and sampling: one padded batch of prompts x n."""
    import torch

    from posttrain.config import ModelConfig, RolloutConfig
    from posttrain.rollout.engine import RolloutEngine

    torch.set_num_threads(cores)
    engine = RolloutEngine(ModelConfig(name=model_dir), RolloutConfig(backend="transformers", cpus_per_engine=cores))
    engine.generate(msgs[:1], gen.model_copy(update={"max_new_tokens": 4}), n=1)  # warm-up
    return best_of(repeats, lambda: sum(len(r.token_ids) for g in engine.generate(msgs, gen, n=n) for r in g))


def raw_vllm(model_dir: str, msgs: list, gen: Any, n: int, cfg: Any) -> tuple[Callable[[], int], Callable[[], None]]:
    """(a) ``LLM.generate`` with exactly the requests the engine sends (same ids, params, seeds).

    Returns ``(run, close)``: ``run()`` generates the batch once and returns the token count.
    """
    from vllm import LLM, SamplingParams

    from posttrain import chat_template, models
    from posttrain.rollout.backend_vllm import set_cpu_env
    from posttrain.rollout.types import request_seed

    set_cpu_env(cfg, rank=0)
    tok = models.load_tokenizer(model_dir)
    ids = [tok(chat_template.render(tok, m, add_generation_prompt=True, enable_thinking=gen.enable_thinking),
               add_special_tokens=False).input_ids for m in msgs]
    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=cfg.max_model_len, seed=0,
              enable_prefix_caching=True, logprobs_mode="processed_logprobs")
    requests = [{"prompt_token_ids": p} for p in ids for _ in range(n)]
    sampling = [SamplingParams(n=1, max_tokens=gen.max_new_tokens, temperature=gen.temperature, top_p=gen.top_p,
                               seed=request_seed(gen.seed, p, i), logprobs=0, detokenize=False)
                for p in range(len(ids)) for i in range(n)]
    llm.generate([{"prompt_token_ids": ids[0]}], SamplingParams(max_tokens=4), use_tqdm=False)  # warm-up

    def run() -> int:
        return sum(len(o.outputs[0].token_ids) for o in llm.generate(requests, sampling, use_tqdm=False))

    return run, llm.llm_engine.engine_core.shutdown


def bench_vllm_paths(model_dir: str, msgs: list, gen: Any, n: int, cfg: Any, args: argparse.Namespace,
                     ) -> tuple[dict, dict]:
    """(a) and (b) timed in alternation (best of ``repeats`` each), so load drift on a shared box hits
    both alike; then ``syncs`` full weight syncs of the pool with a logprob check."""
    from posttrain import models
    from posttrain.config import ModelConfig
    from posttrain.rollout.pool import RolloutPool

    run_a, close_a = raw_vllm(model_dir, msgs, gen, n, cfg)
    try:
        with RolloutPool(ModelConfig(name=model_dir), cfg) as pool:
            pool.generate(msgs[:1], gen.model_copy(update={"max_new_tokens": 4}), n=1)  # warm-up

            def run_b() -> int:
                return sum(len(r.token_ids) for g in pool.generate(msgs, gen, n=n) for r in g)

            best: dict[str, tuple[int, float]] = {}
            for _ in range(args.repeats):
                for name, run in (("(a) vLLM LLM.generate", run_a), ("(b) RolloutPool (Ray)", run_b)):
                    result = best_of(1, run)
                    if name not in best or result[0] / result[1] > best[name][0] / best[name][1]:
                        best[name] = result
            close_a()
            close_a = lambda: None  # noqa: E731 (closed once)
            first = pool.generate(msgs[:1], gen, n=1)[0][0]
            sync = sync_stats(pool, models.load_model(model_dir, device="cpu"), first, args.syncs)
    finally:
        close_a()
    return best, sync


def sync_stats(pool: Any, model: Any, rollout: Any, syncs: int) -> dict:
    from posttrain.rollout.pool import LogprobCheck
    from posttrain.rollout.weight_sync import full_state_dict

    check = LogprobCheck.from_model(model, rollout.prompt_ids + rollout.token_ids, len(rollout.prompt_ids))
    reports = [pool.sync_weights(full_state_dict(model), check=check) for _ in range(syncs)]
    seconds = statistics.median(r.seconds for r in reports)
    return dict(bytes=reports[0].num_bytes, seconds=seconds, diff=max(r.max_abs_logprob_diff for r in reports))


def tiny_sync(cfg: Any, syncs: int) -> dict:
    from posttrain import models
    from posttrain.config import ModelConfig
    from posttrain.rollout.pool import RolloutPool
    folder = models.prepare("tiny-llama")
    with RolloutPool(ModelConfig(name=str(folder)), cfg) as pool:
        from posttrain.config import GenerationConfig

        r = pool.generate(prompts(1), GenerationConfig(max_new_tokens=8))[0][0]
        return sync_stats(pool, models.load_model(str(folder), device="cpu"), r, syncs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--cores", type=int, default=1)
    ap.add_argument("--syncs", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=2,
                    help="timed runs per path; the fastest counts (a shared box adds one-sided noise)")
    ap.add_argument("--ray-temp-dir", default="/tmp/ray-rollout-bench")
    args = ap.parse_args()

    from posttrain import models
    from posttrain.config import GenerationConfig, RolloutConfig
    from posttrain.orchestration import cluster

    model_dir = models.resolve(args.model)
    msgs = prompts(args.prompts)
    gen = GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=0)
    cfg = RolloutConfig(cpus_per_engine=args.cores, kv_cache_gib=1, max_model_len=1024)
    # HF first: raw vLLM in this process pins its OpenMP threads, which would skew HF afterwards.
    rows = {"(c) HF generate": bench_hf(model_dir, msgs, gen, args.samples, args.cores, args.repeats)}
    cluster.init_ray(temp_dir=args.ray_temp_dir)
    try:
        vllm_rows, main_sync = bench_vllm_paths(model_dir, msgs, gen, args.samples, cfg, args)
        rows.update(vllm_rows)
        syncs = {"tiny-llama": tiny_sync(cfg, args.syncs), args.model: main_sync}
    finally:
        cluster.shutdown_ray()
    report(args, rows, syncs)


def report(args: argparse.Namespace, rows: dict, syncs: dict) -> None:
    print(f"\nrollout benchmark: {args.model}, {args.prompts} prompts x {args.samples} samples, "
          f"max_new_tokens {args.max_new_tokens}, temperature {args.temperature}, {args.cores} core(s) per path")
    print(f"{'path':<26}{'tokens':>8}{'seconds':>10}{'tokens/s':>10}")
    rate = {}
    for name in sorted(rows):
        tokens, seconds = rows[name]
        rate[name[:3]] = tokens / seconds
        print(f"{name:<26}{tokens:>8}{seconds:>10.2f}{tokens / seconds:>10.1f}")
    print(f"ratios: (b)/(a) = {rate['(b)'] / rate['(a)']:.2f} (target >= 0.9), "
          f"(b)/(c) = {rate['(b)'] / rate['(c)']:.2f} (target >= 2)")
    print(f"\n{'weight sync (full)':<26}{'MB':>8}{'seconds':>10}{'MB/s':>10}{'max|dlogp|':>12}")
    for name, s in syncs.items():
        mb = s["bytes"] / 1e6
        print(f"{name:<26}{mb:>8.1f}{s['seconds']:>10.3f}{mb / s['seconds']:>10.0f}{s['diff']:>12.2e}")


if __name__ == "__main__":  # vLLM starts workers with spawn: entry points need this guard
    main()
