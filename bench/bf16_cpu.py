"""fp32 vs bf16 on this CPU, side by side: a training step (``train.mixed_precision``) and vLLM
generation and prefill (``rollout.dtype``), on SmolLM2-135M-Instruct (the embedded default).

    .venv/bin/python bench/bf16_cpu.py [--threads 2] [--skip-vllm]

Training: forward + backward + AdamW of the full model on 4 x 256-token rows, fp32 weights, with
and without bf16 autocast (our chunked loss, as SFT runs it). vLLM: one engine per dtype, each in
its own process, 400 judge-like greedy calls (prefill-heavy, 20 new tokens) and 8 prompts x 8
samples of 96 tokens (decode-heavy). Run it alone on the machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

VLLM_CHILD = r"""
import json, sys, time
from posttrain import models
from posttrain.config import RolloutConfig
from posttrain.rollout.backend_vllm import set_cpu_env
dtype, threads = sys.argv[1], int(sys.argv[2])
set_cpu_env(RolloutConfig(threads_per_engine=threads, kv_cache_gib=2), 0)
from vllm import LLM, SamplingParams
folder = str(models.prepare("smollm2-135m-instruct"))
llm = LLM(model=folder, dtype=dtype, max_model_len=1024, seed=0, enforce_eager=True,
          enable_chunked_prefill=False, max_num_batched_tokens=8192)
base = "Compare the two responses to the question and score each from 1 to 5. " * 3
prompts = [base + f"Question {i}: what is {i} * {i + 3}? Response 1: {i * (i + 3)}. Response 2: {i + 7}." for i in range(400)]
t = time.perf_counter()
out = llm.generate(prompts, SamplingParams(max_tokens=20, temperature=0.0, logprobs=5), use_tqdm=False)
judge_s = time.perf_counter() - t
prefill = sum(len(o.prompt_token_ids) for o in out)
t = time.perf_counter()
out = llm.generate(prompts[:8], SamplingParams(max_tokens=96, temperature=0.8, n=8, seed=0), use_tqdm=False)
gen_s = time.perf_counter() - t
tokens = sum(len(c.token_ids) for o in out for c in o.outputs)
print("RESULT " + json.dumps({"judge_s": judge_s, "prefill_tokens": prefill, "gen_tok_s": tokens / gen_s}))
"""


def train_step_seconds(mixed: str, threads: int, repeats: int = 3) -> float:
    import torch

    from posttrain import models
    from posttrain.config import ModelConfig
    from posttrain.training.loss import causal_lm_nll_sum
    from posttrain.training.model import forward_precision

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = models.model_for(ModelConfig(name="smollm2-135m-instruct"), "cpu")
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (4, 256))
    batch = {"input_ids": ids, "labels": ids}

    def step() -> None:
        with forward_precision(mixed, "cpu"):
            nll, n = causal_lm_nll_sum(model, batch)
        (nll / n).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats


def vllm_figures(dtype: str, threads: int) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", VLLM_CHILD, dtype, str(threads)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if out.returncode:
        raise SystemExit(f"the vLLM {dtype} engine failed:\n{out.stderr[-3000:]}")
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-vllm", action="store_true")
    args = p.parse_args()
    fp32, bf16 = (train_step_seconds(m, args.threads) for m in ("none", "bf16"))
    print(f"\nbf16 vs fp32 on this CPU ({args.threads} threads), SmolLM2-135M-Instruct")
    print(f"{'what':44} {'fp32':>10} {'bf16':>10} {'speed-up':>9}")
    print(f"{'training step (4 x 256 tokens, full model) s':44} {fp32:10.2f} {bf16:10.2f} {fp32 / bf16:8.2f}x")
    if args.skip_vllm:
        return
    a, b = vllm_figures("float32", args.threads), vllm_figures("bfloat16", args.threads)
    print(f"{'vLLM 400 judge calls (' + str(a['prefill_tokens']) + ' prompt tokens) s':44} "
          f"{a['judge_s']:10.1f} {b['judge_s']:10.1f} {a['judge_s'] / b['judge_s']:8.2f}x")
    print(f"{'vLLM sampling, 8 x 8 x 96 tokens, tok/s':44} {a['gen_tok_s']:10.0f} {b['gen_tok_s']:10.0f} "
          f"{b['gen_tok_s'] / a['gen_tok_s']:8.2f}x")


if __name__ == "__main__":
    main()
