"""Peak memory and speed of one SFT step at long context: ours vs TRL's default SFTTrainer.

Each (model, tokens, method) runs in its own process, so peak RSS (``ru_maxrss``) is that
step's alone. One document of N random tokens, every token labelled, batch 1, AdamW step.

    python bench/sft_long_context.py                      # 4K, 16K, 32K; tiny-llama + tiny-nemotron-h
    python bench/sft_long_context.py --tokens 4096 16384 --models tiny-llama
    python bench/sft_long_context.py --long               # adds 64K and 256K (hours on 2 cores)

Methods: ``ours`` = trunk forward with gradient checkpointing + chunked CE
(posttrain.training.loss); ``trl`` = ``trl.SFTTrainer`` with its defaults (bf16 off on CPU);
``hf`` = plain ``model(labels=...)`` with full ``[T, V]`` logits (checkpointing on).
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
GIB = 1024**3


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB


def _ids(n: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(n)
    return torch.randint(100, 49000, (n,), generator=g).tolist()


def _ours(folder: str, ids: list[int], method: str) -> tuple[float, float]:
    import torch
    from transformers import AutoModelForCausalLM

    from posttrain.sft.config import TrainConfig
    from posttrain.training.config import LoraConfig
    from posttrain.training.model import prepare_for_training
    from posttrain.training.loss import causal_lm_nll_sum

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = prepare_for_training(model, TrainConfig(gradient_checkpointing=True), LoraConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([ids])}
    t0 = time.perf_counter()
    if method == "ours":
        nll, n = causal_lm_nll_sum(model, batch, chunk_size=2048)
        loss = nll / n
    else:  # hf: full logits
        loss = model(**batch, use_cache=False).loss
    loss.backward()
    opt.step()
    return time.perf_counter() - t0, float(loss)


def _trl(folder: str, ids: list[int]) -> tuple[float, float]:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    args = SFTConfig(output_dir=os.environ.get("BENCH_TMP", "/tmp/bench-trl"), max_length=len(ids),
                     per_device_train_batch_size=1, max_steps=1, learning_rate=1e-5, bf16=False,
                     report_to=[], save_strategy="no", logging_steps=1, dataloader_num_workers=0,
                     disable_tqdm=True)
    trainer = SFTTrainer(model=model, args=args, processing_class=tok,
                         train_dataset=datasets.Dataset.from_dict({"input_ids": [ids]}))
    t0 = time.perf_counter()
    out = trainer.train()
    return time.perf_counter() - t0, float(out.training_loss)


def worker(model: str, tokens: int, method: str) -> None:
    from posttrain import models

    folder = str(models.prepare(model))
    ids = _ids(tokens)
    seconds, loss = _trl(folder, ids) if method == "trl" else _ours(folder, ids, method)
    print("RESULT " + json.dumps({"model": model, "tokens": tokens, "method": method, "peak_rss_gib": _rss_gib(),
                                  "seconds": seconds, "tok_s": tokens / seconds, "loss": loss}), flush=True)


def run_one(model: str, tokens: int, method: str, timeout: float) -> dict:
    cmd = [sys.executable, __file__, "--worker", model, str(tokens), method]
    return run_worker(cmd, {"model": model, "tokens": tokens, "method": method}, timeout)


def table(results: list[dict]) -> str:
    rows = ["| model | tokens | method | peak RSS GiB | step s | tok/s | loss |", "|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['model']} | {r['tokens']} | {r['method']} | error: {r['error']} | | | |")
        else:
            rows.append(f"| {r['model']} | {r['tokens']} | {r['method']} | {r['peak_rss_gib']:.2f} | "
                        f"{r['seconds']:.1f} | {r['tok_s']:.0f} | {r['loss']:.4f} |")
    return "\n".join(rows)


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        worker(sys.argv[2], int(sys.argv[3]), sys.argv[4])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-llama", "tiny-nemotron-h"])
    parser.add_argument("--tokens", nargs="+", type=int, default=[4096, 16384, 32768])
    parser.add_argument("--methods", nargs="+", default=["ours", "trl"], choices=["ours", "trl", "hf"])
    parser.add_argument("--long", action="store_true", help="add 65536 and 262144 tokens")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    sizes = args.tokens + ([65536, 262144] if args.long else [])
    results = []
    for model in args.models:
        for tokens in sizes:
            for method in args.methods:
                results.append(run_one(model, tokens, method, args.timeout))
                print(json.dumps(results[-1]), file=sys.stderr, flush=True)
    publish(table(results), results, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
