"""LoRA adapters (PEFT format) merged into a base state dict, for backends without native LoRA."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

_PREFIX = "base_model.model."


def merged_state(base: dict[str, Any], folder: str) -> dict[str, Any]:
    """``W + (alpha / r) · B @ A`` for every adapted weight; other tensors as in ``base``."""
    from safetensors.torch import load_file

    cfg = json.loads(Path(folder, "adapter_config.json").read_text())
    scale = float(cfg.get("lora_alpha", cfg["r"])) / float(cfg["r"])
    adapter = load_file(os.path.join(folder, "adapter_model.safetensors"))
    merged = dict(base)
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        b = adapter[key.replace(".lora_A.", ".lora_B.")]
        target = key.removeprefix(_PREFIX).replace(".lora_A.default.weight", ".weight")
        target = target.replace(".lora_A.weight", ".weight")
        if target not in base:
            raise KeyError(f"LoRA adapter key {key!r} targets {target!r}, which the model does not have")
        w = base[target]
        merged[target] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)  # [out, in]
    return merged
