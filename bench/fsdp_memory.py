"""Per-rank bytes of parameters + gradients + AdamW state, replicated vs FSDP2-sharded, and step time.

    python bench/fsdp_memory.py                                   # one process (replicated)
    torchrun --standalone --nproc_per_node 2 bench/fsdp_memory.py # 2 ranks, FSDP2
    torchrun --standalone --nproc_per_node 2 bench/fsdp_memory.py --replicated   # 2 ranks, plain DP

A random-init Llama of SmolLM2-135M's shape (30 layers, hidden 576, vocab 49152, tied head), fp32,
one AdamW step on ``--tokens`` tokens. Bytes are counted from the tensors each rank holds (local
shards under FSDP), so they do not depend on the allocator or on other processes on the box.
"""

from __future__ import annotations

import argparse
import time

import torch

from posttrain.training import parallel
from posttrain.training.config import FsdpConfig
from posttrain.training.loss import causal_lm_nll_sum


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--replicated", action="store_true", help="no FSDP: every rank holds everything")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM

    par = parallel.init_from_env()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg)
    if not args.replicated:
        model = parallel.shard_model(model, par, FsdpConfig(enabled=True))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, cfg.vocab_size, (1, args.tokens), generator=torch.Generator().manual_seed(par.rank))
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        nll, n = causal_lm_nll_sum(model, {"input_ids": ids, "labels": ids})
        (nll / n).backward()
        if not parallel.is_sharded(model):
            parallel.all_reduce_grads(params, par)
        grads = _local_bytes(p.grad for p in params if p.grad is not None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    weights = _local_bytes(params)
    state = _local_bytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    total = weights + grads + state
    gib = 2**30
    rows = parallel.all_gather_objects((par.rank, weights, grads, state, total), par) if par.world > 1 else \
        [(0, weights, grads, state, total)]
    if par.main:
        mode = "replicated" if args.replicated or par.world == 1 else "fsdp"
        for rank, w, g, s, t in rows:
            print(f"{mode} world={par.world} rank={rank}: params {w / gib:.3f} GiB, grads {g / gib:.3f} GiB, "
                  f"adamw {s / gib:.3f} GiB, total {t / gib:.3f} GiB; step {min(times):.2f} s "
                  f"({par.world * args.tokens / min(times):.0f} tok/s over all ranks)")
    parallel.barrier(par)


if __name__ == "__main__":
    main()
