"""Per-rank activation memory and time of one SFT forward/backward with context parallelism, CP=1 vs CP=2.

Each (model, tokens, cp) runs in fresh processes (``torchrun --nproc_per_node CP``, gloo), so peak
RSS is that step's alone. The row is two packed documents whose seam is off the chunk
boundaries; gradient checkpointing on; loss through ``training.context_parallel.cp_nll_sum``
(CP=1 runs the same code in one process). "act" = peak RSS minus RSS after loading the model,
the largest over ranks; the ratio column is CP=2 / CP=1; |dloss| is CP=2's loss minus CP=1's.
The workers run with ``MALLOC_MMAP_THRESHOLD_=131072`` (unless set): glibc otherwise raises its
mmap threshold after the first large free and keeps later freed blocks in the heap, so peak RSS
would measure the allocator's history (up to 2x the live tensors here), not the step's memory.

    python bench/sft_context_parallel.py                        # tiny-llama, 16K and 32K
    python bench/sft_context_parallel.py --models tiny-llama tiny-nemotron-h --tokens 32768 65536 131072
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

from worker_result import publish, run_worker  # bench/ is the script's folder

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")  # inherited by the workers: RSS tracks live memory
GIB = 1024**3


def _rss_now_gib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / GIB


def worker(model_name: str, tokens: int, loss_chunk: int) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from posttrain import models
    from posttrain.training import context_parallel as cp

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    group = dist.group.WORLD if world > 1 else None
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_pretrained(str(models.prepare(model_name)), dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    g = torch.Generator().manual_seed(tokens)
    ids = torch.randint(100, 49000, (1, tokens), generator=g)
    first = tokens // 2 + 37
    batch = {"input_ids": ids, "labels": ids.clone(),
             "position_ids": torch.cat([torch.arange(first), torch.arange(tokens - first)])[None]}
    base = _rss_now_gib()
    t0 = time.perf_counter()
    nll, count = cp.cp_nll_sum(model, batch, group, loss_chunk)
    (nll / count).backward()
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
    loss = nll.detach().reshape(1)
    stats = torch.tensor([peak - base, peak])
    if world > 1:
        dist.all_reduce(loss)
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    if world == 1 or dist.get_rank() == 0:
        print("RESULT " + json.dumps({"model": model_name, "tokens": tokens, "cp": world, "act_gib": float(stats[0]),
                                      "peak_rss_gib": float(stats[1]), "seconds": seconds,
                                      "loss": float(loss) / count}), flush=True)
    if world > 1:
        dist.destroy_process_group()


def run_one(model: str, tokens: int, cp: int, loss_chunk: int, timeout: float, port: int) -> dict:
    args = [__file__, "--worker", model, str(tokens), str(loss_chunk)]
    cmd = ([sys.executable, *args] if cp == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(cp), "--master_port", str(port), *args])
    return run_worker(cmd, {"model": model, "tokens": tokens, "cp": cp}, timeout)


def table(results: list[dict]) -> str:
    rows = ["| model | tokens | cp | act GiB (max rank) | vs CP=1 | step s | loss | |dloss| |",
            "|---|---|---|---|---|---|---|---|"]
    base = {(r["model"], r["tokens"]): r for r in results if r.get("cp") == 1 and "error" not in r}
    for r in results:
        if "error" in r:
            rows.append(f"| {r['model']} | {r['tokens']} | {r['cp']} | error: {r['error']} | | | | |")
            continue
        ref = base.get((r["model"], r["tokens"]))
        ratio = f"{r['act_gib'] / ref['act_gib']:.2f}x" if ref else ""
        dloss = f"{abs(r['loss'] - ref['loss']):.1e}" if ref else ""
        rows.append(f"| {r['model']} | {r['tokens']} | {r['cp']} | {r['act_gib']:.3f} | {ratio} | "
                    f"{r['seconds']:.1f} | {r['loss']:.5f} | {dloss} |")
    return "\n".join(rows)


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-llama"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[16384, 32768])
    parser.add_argument("--cp", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--loss-chunk", type=int, default=256, help="positions per LM-head chunk (a fixed cost)")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument("--port", type=int, default=29631, help="torchrun rendezvous port")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = []
    for model in args.models:
        for tokens in args.tokens:
            for cp in sorted(args.cp):
                results.append(run_one(model, tokens, cp, args.loss_chunk, args.timeout, args.port))
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    publish(table(results), results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
