"""`posttrain export --fp8 MODEL --out DIR`: the recipe's last step, FP8 post-training quantisation.

The chosen Linear layers' weights become ``float8_e4m3fn`` with one scale per output channel
(absmax / 448); activations are quantised per token when the model runs (FP8 "dynamic": no
calibration data). ``compressed-tensors`` writes the checkpoint, the format vLLM loads with its FP8
kernels on Ada/Hopper GPUs. Selective as Nemotron 3 Nano did it (DESIGN.md section 1): the LM head,
every attention layer's projections and, in hybrid models, the Mamba layer that feeds each attention
layer stay in bf16; Mamba's conv1d and MoE routers are not Linear layers and are left alone.
``selective=False`` quantises every Linear but the LM head. MoE experts that transformers keeps fused
as 3-D tensors (NemotronH's routed experts, most of Nano's weights) are quantised the same way, one
scale per expert and output channel, and written under the checkpoint's per-expert Linear names
(``...experts.E.up_proj.weight`` + ``weight_scale``): vLLM's compressed-tensors MoE method reads them
as the ``Linear`` scheme.

``dequantized=DIR`` also writes the quantised weights back in bf16 as a plain model folder (weight x
scale, shard by shard; our own few lines, since transformers' decompression skips fused experts): on a
machine without FP8 kernels (this CPU box) that is how the weights' quality is measured
(``bench/fp8_export.py``). The activations' per-token FP8 rounding happens only in vLLM on GPU and is
not in that measurement.

The whole model is loaded once in bf16 on the CPU (62 GiB for Nano: a large host, not a GPU).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from posttrain.atomic import atomic_dir
from posttrain.errors import ConfigError
from posttrain.training.memory_plan import LAYER_KINDS

log = logging.getLogger(__name__)
FP8_MAX = 448.0  # largest float8_e4m3fn value
INDEX = "model.safetensors.index.json"
QUANT_PARAMS = ("weight_scale", "weight_zero_point", "input_scale", "input_zero_point")  # compressed-tensors'


def kept_in_bf16(model: Any, selective: bool = True) -> list[str]:
    """Names of the Linear layers that stay in bf16: the LM head always; with ``selective`` every
    attention layer's projections and, in NemotronH, the Mamba layer right before each attention layer."""
    import torch

    head = model.get_output_embeddings()
    linears = {name: module for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}
    kept = {name for name, module in linears.items() if module is head}
    if not selective:
        return sorted(kept)
    attention = [name for name, module in model.named_modules() if type(module).__name__.endswith("Attention")]
    feeding = []
    layers = [(name, module) for name, module in model.named_modules() if hasattr(module, "block_type")]
    kinds = [LAYER_KINDS.get(module.block_type) for _, module in layers]  # "M", "*", "E", "-"
    for (prev_name, _), prev, kind in zip(layers, kinds, kinds[1:]):  # NemotronH: a Mamba layer before attention
        if kind == "*" and prev == "M":
            feeding.append(prev_name)
    for name in linears:
        if any(name.startswith(prefix + ".") for prefix in (*attention, *feeding)):
            kept.add(name)
    return sorted(kept)


def export_fp8(model_dir: str, out: str, *, selective: bool = True, dequantized: str | None = None) -> dict[str, Any]:
    """Quantise ``model_dir`` (a model name or folder) to an FP8 compressed-tensors folder ``out``.

    Returns a summary: layers quantised and kept, weight bytes before and after. Both folders are
    written atomically (a crash leaves no half folder) with the tokenizer and chat template."""
    import torch
    from compressed_tensors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme
    from transformers.core_model_loading import revert_weight_conversion

    from posttrain import models

    model = models.load_model(model_dir, dtype="bfloat16", device="cpu")
    local = Path(model_dir)
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json")
    weights_only = local.is_dir() and not any((local / f).is_file() for f in tokenizer_files)
    if weights_only:
        log.warning("%s has no tokenizer: the FP8 folder will have none either", model_dir)
    tokenizer = None if weights_only else models.load_tokenizer(model_dir, template="model")  # its own template
    before = sum(p.numel() * p.element_size() for p in model.parameters())
    kept = kept_in_bf16(model, selective)
    scheme = preset_name_to_scheme("FP8_DYNAMIC", ["Linear"])
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme}, ignore=kept))
    quantized = [name for name, module in model.named_modules() if hasattr(module, "weight_scale")]
    with torch.no_grad():
        for name in quantized:
            module = model.get_submodule(name)
            module.weight_scale.copy_(_channel_scale(module.weight).to(module.weight_scale.dtype))
        experts = fused_experts(model)
        if not quantized and not experts:
            raise ConfigError(f"{model_dir}: no Linear layer left to quantise (kept in bf16: {len(kept)})")
        compressor = ModelCompressor.from_pretrained_model(model)
        compressor.compress_model(model)
        state = model.state_dict()
        weights, scales = {}, {}
        for key in experts:
            w = state.pop(key)
            scales[key] = _channel_scale(w).to(w.dtype)  # [experts, out, 1], stored as the Linear layers' are
            weights[key] = (w.float() / scales[key].float()).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        # the checkpoint's own names (e.g. backbone.layers.2.mixer.experts.5.up_proj.weight): transformers
        # splits the fused tensors back per expert, and the scales the same way
        state = revert_weight_conversion(model, state)
        state.update(revert_weight_conversion(model, weights))
        state.update({k.removesuffix(".weight") + ".weight_scale": v.reshape(-1, 1)
                      for k, v in revert_weight_conversion(model, scales).items()})
    with atomic_dir(Path(out)) as tmp:
        model.save_pretrained(tmp, state_dict=state, save_original_format=False)
        compressor.update_config(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    after = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    summary = {"quantized_layers": len(quantized), "quantized_expert_tensors": len(experts),
               "kept_bf16_layers": len(kept), "weights_gib_bf16": round(before / 2**30, 4),
               "checkpoint_gib_fp8": round(after / 2**30, 4), "out": str(out)}
    if dequantized:
        summary["dequantized"] = write_dequantized(out, dequantized)
    log.info("FP8 export: %s", json.dumps(summary))
    return summary


def fused_experts(model: Any) -> list[str]:
    """State-dict keys of MoE expert weights kept fused as 3-D tensors [experts, out, in] (not Linear layers)."""
    return [f"{name}.{param}" for name, module in model.named_modules() if type(module).__name__.endswith("Experts")
            for param, tensor in module.named_parameters(recurse=False) if tensor.dim() == 3]


def _channel_scale(weight: Any) -> Any:
    """One FP8 scale per output channel (per expert too, for 3-D weights): absmax / 448, in fp32."""
    return weight.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / FP8_MAX


def write_dequantized(fp8_dir: str, out: str) -> str:
    """The FP8 folder's weights back in bf16 (weight x scale) as a plain folder, one shard at a time."""
    import shutil

    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    source = Path(fp8_dir)
    with atomic_dir(Path(out)) as tmp:
        for f in source.iterdir():
            if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", INDEX):
                shutil.copy2(f, tmp / f.name)  # tokenizer, chat template, generation config
        config = json.loads((source / "config.json").read_text())
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        shards = sorted(source.glob("*.safetensors"))
        scales = {}  # small ([out, 1] per layer), and a weight's scale may sit in the next shard
        for shard in shards:
            with safe_open(str(shard), "pt") as f:
                scales.update({k: f.get_tensor(k) for k in f.keys() if k.endswith(".weight_scale")})
        total = 0
        for shard in shards:
            plain = {}
            for key, tensor in load_file(shard).items():
                if key.endswith(QUANT_PARAMS):
                    continue
                scale = scales.get(key.removesuffix("weight") + "weight_scale") if key.endswith(".weight") else None
                plain[key] = tensor if scale is None else (tensor.float() * scale.float()).to(torch.bfloat16)
            save_file(plain, tmp / shard.name, metadata={"format": "pt"})
            total += sum(t.numel() * t.element_size() for t in plain.values())
        if (source / INDEX).is_file():  # a sharded checkpoint: its map without the scales
            index = json.loads((source / INDEX).read_text())
            index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.endswith(QUANT_PARAMS)}
            index["metadata"] = {**index.get("metadata", {}), "total_size": total}
            (tmp / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return str(out)


def _export(args: Any) -> int:
    if not args.fp8:
        raise ConfigError("posttrain export: say which format (--fp8; the only one so far)")
    summary = export_fp8(args.model, args.out, selective=not args.all_layers, dequantized=args.dequantized)
    print(json.dumps(summary, indent=1))
    return 0


def add_commands(sub: Any) -> None:
    p = sub.add_parser("export", help="quantise a trained model for serving (--fp8: compressed-tensors FP8, vLLM)",
                       description="posttrain export --fp8 MODEL --out DIR [--dequantized DIR] [--all-layers]")
    p.add_argument("model", help="model folder (e.g. RUN/model), built-in name or hub id")
    p.add_argument("--fp8", action="store_true", help="FP8 weights per channel, FP8 activations per token (dynamic)")
    p.add_argument("--out", required=True, help="folder to write (replaced atomically)")
    p.add_argument("--dequantized", metavar="DIR", help=(
        "also write the FP8 weights back in bf16 (quality checks on CPU)"))
    p.add_argument("--all-layers", action="store_true", help=(
        "quantise attention and the layers feeding it too (default: kept in bf16, as the recipe did)"))
    p.set_defaults(func=_export)
