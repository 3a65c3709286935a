"""The memory plan (posttrain/training/memory_plan.py) against one measured SFT step, side by side.

    python bench/memory_plan_check.py                              # tiny-llama, tiny-nemotron-h at 4096 tokens
    python bench/memory_plan_check.py --models tiny-llama --tokens 4096 8192
    python bench/memory_plan_check.py --tokens 16384 --loss-chunk 256   # activations, not the logits block, dominate

Each (model, tokens) runs in its own process: fp32, gradient checkpointing, 2048-row chunked loss,
AdamW, one document of N tokens all labelled (what ``posttrain sft`` does in one process).
Parameters, gradients and AdamW state are counted from the tensors; the rest of the step
(activations, loss chunk) is measured as peak RSS during the step minus the RSS before it, less
the gradients and optimizer state created meanwhile, so the interpreter and libraries drop out.
The children run with ``MALLOC_MMAP_THRESHOLD_=131072`` (unless set), so RSS tracks live tensors
rather than blocks glibc keeps in its heap after raising its mmap threshold.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "131072")  # inherited by the measuring children
MIB = 1024**2


def _rss_now() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def measure(name: str, tokens: int, chunk: int) -> dict[str, int]:
    """One step in this process: exact tensor bytes and the step's peak RSS above its start."""
    import torch
    from transformers import AutoModelForCausalLM

    from posttrain import models
    from posttrain.sft.config import TrainConfig
    from posttrain.training.config import LoraConfig
    from posttrain.training.loss import causal_lm_nll_sum
    from posttrain.training.model import prepare_for_training

    folder = models.prepare(name)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = prepare_for_training(model, TrainConfig(gradient_checkpointing=True), LoraConfig())
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(100, 49000, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    batch = {"input_ids": ids, "labels": ids}
    before = _rss_now()
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 <= before * 1.05 + 64 * MIB, "load peaked higher"
    nll, n = causal_lm_nll_sum(model, batch, chunk_size=chunk)
    (nll / n).backward()
    grads = _tensor_bytes(p.grad for p in params if p.grad is not None)
    opt.step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    state = _tensor_bytes(v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
    seen = {id(p): p for p in model.parameters()}
    return {"params": _tensor_bytes(seen.values()), "grads": grads, "optimizer": state,
            "step_peak": peak - before, "rest": peak - before - grads - state}


def estimate(name: str, tokens: int, chunk: int) -> dict[str, int]:
    from posttrain import models
    from posttrain.training.memory_plan import StepShape, load_hf_config, plan

    cfg = load_hf_config(str(models.prepare(name)))
    rows = plan(cfg, StepShape(tokens=tokens, dtype="float32", loss_chunk=chunk)).rows
    pick = lambda word: sum(v for k, v in rows.items() if k.startswith(word))  # noqa: E731
    act = pick("activations") + pick("loss") + pick("final hidden")
    return {"params": pick("parameters"), "grads": pick("gradients"), "optimizer": pick("optimizer"),
            "rest": act, "step_peak": pick("gradients") + pick("optimizer") + act}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["tiny-llama", "tiny-nemotron-h"])
    ap.add_argument("--tokens", nargs="+", type=int, default=[4096])
    ap.add_argument("--loss-chunk", type=int, default=2048, help="rows of logits per loss chunk")
    ap.add_argument("--one", nargs=3, help=argparse.SUPPRESS)  # child: MODEL TOKENS
    args = ap.parse_args()
    if args.one:
        print(json.dumps(measure(args.one[0], int(args.one[1]), int(args.one[2]))))
        return
    print(f"| model (loss chunk {args.loss_chunk}) | tokens | row | estimate MiB | measured MiB | est/meas |")
    print("|---|---|---|---|---|---|")
    for name in args.models:
        for n in args.tokens:
            out = subprocess.run([sys.executable, __file__, "--one", name, str(n), str(args.loss_chunk)], check=True,
                                 capture_output=True, text=True).stdout.strip().splitlines()[-1]
            got, est = json.loads(out), estimate(name, n, args.loss_chunk)
            for row in ("params", "grads", "optimizer", "rest", "step_peak"):
                print(f"| {name} | {n} | {row} | {est[row] / MIB:.1f} | {got[row] / MIB:.1f} | "
                      f"{est[row] / max(got[row], 1):.2f} |", flush=True)


if __name__ == "__main__":
    main()
