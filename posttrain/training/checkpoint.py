"""Training checkpoints: an HF-format model folder plus what exact resume needs.

Layout of ``RUN/checkpoints/step-00000042/`` (written under a hidden name and renamed into
place in one step, so a killed run never leaves a half checkpoint that resume would pick)::

    model/        save_pretrained(): full weights (+ tokenizer), or a peft adapter for LoRA;
                  loadable by transformers and vLLM (vLLM takes the adapter via enable_lora)
    trainer.pt    optimizer + LR-scheduler state and the RNG states
    state.json    step, tokens seen, data position, anything the loop wants back

Generic on purpose: the RL trainer saves and resumes through the same two calls.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from posttrain.atomic import atomic_dir, file_lock, remove_stale_tmp
from posttrain.models import head_is_tied

STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int
    state: dict[str, Any]


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config")


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: str | Path, step: int, model: Any, optimizer: Any, scheduler: Any = None,
                    tokenizer: Any = None, state: dict[str, Any] | None = None, keep_last: int = 2) -> Path:
    """Write ``RUN/checkpoints/step-NNNNNNNN`` atomically; prune all but the newest ``keep_last``."""
    root = Path(run_dir) / "checkpoints"
    target = root / f"step-{step:08d}"
    with file_lock(root / ".lock"):
        remove_stale_tmp(target)
        with atomic_dir(target) as tmp:
            model.save_pretrained(tmp / "model", safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / "model")
            torch.save({"optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict() if scheduler is not None else None,
                        "rng": rng_state()}, tmp / "trainer.pt")
            (tmp / "state.json").write_text(json.dumps({"step": step, **(state or {})}, indent=2))
        for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            _remove(old)
    return target


def _remove(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (hidden temporary folders are skipped)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def latest_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    found = list_checkpoints(run_dir)
    if not found:
        return None
    state = json.loads((found[-1] / "state.json").read_text())
    return Checkpoint(path=found[-1], step=int(state["step"]), state=state)


def load_model_weights(model: Any, folder: str | Path) -> None:
    """Load a ``save_pretrained`` folder's weights into an already built ``model`` in place.

    For peft models the folder is an adapter; for plain models every ``*.safetensors`` shard is
    read and all keys must match (tied output embeddings may be absent).
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    if _is_peft(model):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, load_file(folder / "adapter_model.safetensors"))
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"{folder}: adapter keys not in the model: {result.unexpected_keys[:5]}")
        return
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"{folder} holds no *.safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for shard in shards:
        weights.update(load_file(shard))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and head_is_tied(model))]
    if missing or unexpected:
        raise RuntimeError(f"{folder}: weights do not match the model (missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]}); was it saved from another architecture?")


def load_checkpoint(ckpt: Checkpoint, model: Any, optimizer: Any, scheduler: Any = None) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and RNG from ``ckpt``; returns its ``state.json``."""
    load_model_weights(model, ckpt.path / "model")
    trainer = torch.load(ckpt.path / "trainer.pt", map_location="cpu", weights_only=False)
    optimizer.load_state_dict(trainer["optimizer"])
    if scheduler is not None and trainer["scheduler"] is not None:
        scheduler.load_state_dict(trainer["scheduler"])
    set_rng_state(trainer["rng"])
    return ckpt.state
