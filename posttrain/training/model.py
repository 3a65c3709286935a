"""Model set-up for training, shared by SFT and RL: LoRA (peft), router and lower-layer freezing,
gradient checkpointing, parameter counts."""

from __future__ import annotations

import contextlib
import logging
from typing import Any, Protocol

import torch

from posttrain.errors import ConfigError
from posttrain.training.config import LoraConfig
from posttrain.training.loss import trunk_and_head

log = logging.getLogger(__name__)

NEMOTRON_H_LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "up_proj", "down_proj"]


class TrainingSetup(Protocol):
    """The keys of a stage's ``train`` section that shape the model (SFT's and RL's both have them)."""

    gradient_checkpointing: bool
    freeze_router: bool
    freeze_layers: int


def lora_targets(cfg: LoraConfig, model: Any) -> list[str] | str:
    if cfg.target_modules != "auto":
        return cfg.target_modules
    return NEMOTRON_H_LORA_TARGETS if model.config.model_type == "nemotron_h" else "all-linear"


def freeze_router(model: Any) -> int:
    """Freeze MoE router weights (gates choosing experts); returns how many tensors were frozen."""
    frozen = 0
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if type(module).__name__.endswith("Router") or leaf in ("gate", "router"):
            for p in module.parameters(recurse=False):
                p.requires_grad_(False)
                frozen += 1
    if frozen == 0:
        raise ConfigError(f"train.freeze_router=true but {type(model).__name__} has no MoE router; set it to false")
    return frozen


def freeze_lower_layers(model: Any, n: int) -> int:
    """Freeze the input embeddings and the first ``n`` decoder layers; returns how many tensors were frozen.

    The backward pass then stops at layer ``n``: a step costs about ``(1 + 2 (L - n) / L) / 3`` of a
    full one (forward everywhere, backward only above), which is what makes short fine-tunes on a
    CPU affordable. With tied embeddings the LM head is frozen too.
    """
    trunk, _ = trunk_and_head(model)
    layers = getattr(trunk, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(f"train.freeze_layers: {type(trunk).__name__} has no 'layers' list of decoder layers")
    if not 0 < n < len(layers):
        raise ConfigError(f"train.freeze_layers must be between 1 and {len(layers) - 1} for this model "
                          f"({len(layers)} layers; got {n})")
    frozen = 0
    for module in (model.get_input_embeddings(), *layers[:n]):
        for p in module.parameters():
            frozen += int(p.requires_grad)
            p.requires_grad_(False)
    return frozen


def prepare_for_training(model: Any, train: TrainingSetup, lora: LoraConfig, *, task_type: str = "CAUSAL_LM",
                         modules_to_save: list[str] | None = None) -> Any:
    """Gradient checkpointing, then LoRA or full fine-tuning, then router and lower-layer freezing.
    ``task_type`` / ``modules_to_save``: peft's, for LoRA on other heads (a reward model: SEQ_CLS, its
    new ``score`` head trained in full)."""
    if train.gradient_checkpointing:
        if getattr(model, "supports_gradient_checkpointing", False):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            log.warning("%s does not support gradient checkpointing; training without it", type(model).__name__)
    if lora.enabled:
        from peft import LoraConfig as PeftLoraConfig, get_peft_model

        peft_cfg = PeftLoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                  target_modules=lora_targets(lora, model), task_type=task_type,
                                  modules_to_save=modules_to_save)
        try:
            model = get_peft_model(model, peft_cfg)
        except ValueError as exc:
            raise ConfigError(f"lora.target_modules={peft_cfg.target_modules!r} does not fit "
                              f"{type(model).__name__}: {exc}. Name Linear layers explicitly.") from exc
    if train.freeze_router:
        log.info("froze %d router tensors", freeze_router(model))
    if train.freeze_layers:
        log.info("froze the embeddings and the first %d layers (%d tensors)", train.freeze_layers,
                 freeze_lower_layers(model, train.freeze_layers))
    model.train()
    return model


def forward_precision(mixed_precision: str, device: str) -> contextlib.AbstractContextManager[Any]:
    """The context of a training forward pass: bf16 autocast for ``train.mixed_precision: bf16`` (backward
    then runs each op in its forward's dtype), else none. The chunked loss keeps the LM head in fp32."""
    if mixed_precision == "none":
        return contextlib.nullcontext()
    kind = torch.device(device).type
    if kind == "cpu":
        from posttrain.models import warn_if_bf16_emulated

        warn_if_bf16_emulated("train.mixed_precision: bf16")
    return torch.autocast(device_type=kind, dtype=torch.bfloat16)


def count_params(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
