"""Checkpoints and HF export of a sharded (FSDP2) model, written by every rank.

Layout of ``RUN/checkpoints/step-00000042/`` when ``train.fsdp.enabled`` (same atomic rename as
:mod:`posttrain.training.checkpoint`: rank 0 builds the hidden folder, every rank writes its shard
into it, rank 0 renames it into place)::

    dcp/          torch.distributed.checkpoint: model + AdamW state, one file per rank plus
                  .metadata; loadable at any world size (DCP reshards on load), also into an
                  unsharded model in one process. Frozen weights (LoRA base, freeze_layers) are
                  not stored: they are the start model's.
    trainer.pt    LR-scheduler state and the RNG states (rank 0's)
    model/        config and tokenizer only (weights: ``dcp/``; the final ``RUN/model`` is a full HF folder)
    state.json    step and whatever the loop wants back

The final HF export gathers one tensor at a time (``DTensor.full_tensor``) and rank 0 writes them
into safetensors shards of at most ``max_shard_bytes``: no rank ever holds the whole model.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from posttrain.atomic import atomic_dir, file_lock, remove_stale_tmp
from posttrain.training.checkpoint import Checkpoint, list_checkpoints, load_checkpoint, rng_state, set_rng_state
from posttrain.training.parallel import Parallel, all_gather_objects, barrier

DCP_DIR = "dcp"


def _state_dicts(model: Any, optimizer: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
    return {"model": msd, "optim": osd}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Without a process group DCP warns that it assumes one process: that is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _shared_tmp(make: Any, par: Parallel) -> Path:
    """Rank 0's temporary folder, known to every rank."""
    path = str(make) if par.main else None
    return Path(all_gather_objects(path, par)[0]) if par.world > 1 else Path(path)  # type: ignore[arg-type]


def save_sharded_checkpoint(run_dir: str | Path, step: int, model: Any, optimizer: Any, scheduler: Any,
                            tokenizer: Any, state: dict[str, Any] | None, keep_last: int, par: Parallel) -> Path:
    """Every rank calls this (a collective): ``RUN/checkpoints/step-NNNNNNNN`` appears in one rename."""
    import torch.distributed.checkpoint as dcp

    root = Path(run_dir) / "checkpoints"
    target = root / f"step-{step:08d}"
    if not par.main:
        tmp = _shared_tmp(None, par)
        with _quiet():
            dcp.save(_state_dicts(model, optimizer), checkpoint_id=tmp / DCP_DIR)
        barrier(par)  # rank 0 renamed the folder
        return target
    with file_lock(root / ".lock"):
        remove_stale_tmp(target)
        with atomic_dir(target) as tmp:
            _shared_tmp(tmp, par)
            with _quiet():
                dcp.save(_state_dicts(model, optimizer), checkpoint_id=tmp / DCP_DIR)  # returns once every rank wrote
            torch.save({"scheduler": scheduler.state_dict() if scheduler is not None else None, "rng": rng_state()},
                       tmp / "trainer.pt")
            _base_config(model).save_pretrained(tmp / "model")
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp / "model")
            (tmp / "state.json").write_text(json.dumps({"step": step, "sharded": True, **(state or {})}, indent=2))
        for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
            import shutil

            shutil.rmtree(old, ignore_errors=True)
    barrier(par)
    return target


def load_any_checkpoint(ckpt: Checkpoint, model: Any, optimizer: Any, scheduler: Any = None) -> dict[str, Any]:
    """Restore a sharded checkpoint (at any world size, sharded model or not) or a plain one."""
    if not (ckpt.path / DCP_DIR).is_dir():
        return load_checkpoint(ckpt, model, optimizer, scheduler)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = _state_dicts(model, optimizer)  # creates empty AdamW state (a zero-lr step) so DCP has somewhere to load
    with _quiet():
        dcp.load(state, checkpoint_id=ckpt.path / DCP_DIR)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=StateDictOptions(ignore_frozen_params=True))
    trainer = torch.load(ckpt.path / "trainer.pt", map_location="cpu", weights_only=False)
    if scheduler is not None and trainer["scheduler"] is not None:
        scheduler.load_state_dict(trainer["scheduler"])
    set_rng_state(trainer["rng"])
    return ckpt.state


# --------------------------------------------------------------------------- HF export, gathered


def _base_config(model: Any) -> Any:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.config


def gathered_weights(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """``(HF name, full tensor)`` one at a time, LoRA merged (``W + scaling * B @ A``), tied copies skipped.

    A tensor is left out only when it *is* one already written (the same object or the same local
    storage, e.g. Llama's tied ``lm_head.weight``); the config's ``tie_word_embeddings`` is not asked:
    transformers 5.19 keeps NemotronH's head separate although its config says tied, and skipping
    it by the flag exported a model that reloads with a fresh head.
    A collective: every rank iterates in step (each ``full_tensor()`` is an all-gather); at most one
    LoRA-wrapped layer's base weight and adapter are held gathered at once.
    """
    peft = hasattr(model, "peft_config")
    aliases = _aliased_names(model.state_dict(keep_vars=True))
    pending: dict[str, dict[str, torch.Tensor]] = {}  # LoRA module -> its gathered pieces
    for name, tensor in model.state_dict().items():
        if name in aliases:
            continue  # HF folders store a tied tensor once (the head as the embedding)
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        tensor = tensor.detach()
        if peft:
            name = name.removeprefix("base_model.model.")
            if ".lora_" in name or ".base_layer.weight" in name:
                module, piece = _lora_piece(name)
                pending.setdefault(module, {})[piece] = tensor
                parts = pending[module]
                if {"base", "A", "B"} <= parts.keys():
                    scaling = model.get_base_model().get_submodule(module).scaling["default"]
                    yield f"{module}.weight", parts["base"] + scaling * (parts["B"].float() @ parts["A"].float()).to(
                        parts["base"].dtype)
                    del pending[module]
                continue
            name = name.replace(".base_layer.", ".")
        yield name, tensor
    if pending:
        raise RuntimeError(f"LoRA modules with missing pieces: {sorted(pending)[:3]}")


def weight_meta(model: Any) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """``(HF name, dtype, full shape)`` of each tensor :func:`gathered_weights` yields for a model without
    LoRA, in its order, read without gathering (a sharded tensor's shape is its global one)."""
    aliases = _aliased_names(model.state_dict(keep_vars=True))
    return [(name, t.dtype, tuple(t.shape)) for name, t in model.state_dict().items() if name not in aliases]


def _aliased_names(state: dict[str, torch.Tensor]) -> set[str]:
    """State-dict names whose tensor is an earlier name's tensor (same object, or same local storage,
    offset, shape and strides: a truly tied weight, also after FSDP made both DTensors)."""
    seen: dict[Any, str] = {}
    out: set[str] = set()
    for name, tensor in state.items():
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        key = (local.untyped_storage().data_ptr(), local.storage_offset(), tuple(local.shape), local.stride()) \
            if local.numel() else ("object", id(tensor))
        if key in seen or ("object", id(tensor)) in seen:
            out.add(name)
            continue
        seen[key] = seen[("object", id(tensor))] = name
    return out


def _lora_piece(name: str) -> tuple[str, str]:
    if name.endswith(".base_layer.weight"):
        return name.removesuffix(".base_layer.weight"), "base"
    module, _, rest = name.partition(".lora_")
    return module, rest[0]  # "A.default.weight" -> "A"


def export_gathered(model: Any, tokenizer: Any, folder: str | Path, par: Parallel,
                    max_shard_bytes: int = 2 << 30) -> Path:
    """Every rank calls this: the final model as an HF folder on rank 0's disk, written atomically.

    Rank 0 holds at most one safetensors shard (``max_shard_bytes``) plus one gathered tensor.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    if not par.main:
        for _ in gathered_weights(model):
            pass
        barrier(par)
        return folder
    with file_lock(folder.parent / f".{folder.name}.lock"):
        remove_stale_tmp(folder)
        with atomic_dir(folder) as tmp:
            base = model.get_base_model() if hasattr(model, "get_base_model") else model
            files: list[tuple[str, list[str]]] = []
            shard: dict[str, torch.Tensor] = {}
            size, block = 0, ""
            for name, tensor in gathered_weights(model):
                if size >= max_shard_bytes and _block(name) != block:  # a block's tensors stay in one file
                    files.append(_write_shard(tmp, len(files), shard, base, save_file))
                    shard, size = {}, 0
                shard[name], block = tensor.to("cpu").contiguous(), _block(name)
                size += tensor.numel() * tensor.element_size()
            if shard or not files:
                files.append(_write_shard(tmp, len(files), shard, base, save_file))
            _name_shards(tmp, files)
            _base_config(model).save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
    barrier(par)
    return folder


def _block(name: str) -> str:
    """``model.layers.3`` for that block's tensors, the name itself otherwise."""
    head, sep, tail = name.partition(".layers.")
    return f"{head}.layers.{tail.split('.', 1)[0]}" if sep else name


def _write_shard(folder: Path, index: int, tensors: dict[str, torch.Tensor], base: Any,
                 save_file: Any) -> tuple[str, list[str]]:
    """One part, in the checkpoint's own names and layout (transformers' save conversion: e.g.
    NemotronH's ``backbone.*`` names and per-expert tensors), as ``save_pretrained`` writes them."""
    from transformers.core_model_loading import revert_weight_conversion

    tensors = revert_weight_conversion(base, tensors)
    name = f"part-{index:05d}.safetensors"
    save_file(tensors, str(folder / name), metadata={"format": "pt"})
    return name, list(tensors)


def _name_shards(folder: Path, files: list[tuple[str, list[str]]]) -> None:
    """HF names: ``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` plus the index."""
    if len(files) == 1:
        (folder / files[0][0]).rename(folder / "model.safetensors")
        return
    weight_map, total = {}, 0
    for i, (name, keys) in enumerate(files):
        final = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        (folder / name).rename(folder / final)
        weight_map.update({k: final for k in keys})
        total += (folder / final).stat().st_size
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
