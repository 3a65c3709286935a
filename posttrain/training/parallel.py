"""The parallel layer SFT and the RL trainer share: process group, device mesh, gradient sums, FSDP2.

One ``Parallel`` value says where this process stands. Its device mesh has three named dims,
``(dp_replicate, dp_shard, cp)`` with sizes ``(1, world // cp, cp)``:

- ``dp_shard``: data parallelism; with ``train.fsdp.enabled`` also the dim FSDP2 shards
  parameters, gradients and optimizer state over (``fully_shard`` per decoder block, then the root);
- ``cp``: context parallelism (``train.context_parallel``; SFT and the RL trainer workers):
  ranks of one cp group hold pieces of the same sequences. Get the group with ``par.cp_group()``
  (``par.mesh["cp"].get_group()``); with cp > 1 FSDP shards over the flattened ``dp_shard x cp``
  (``par.shard_mesh()``), as torchtitan does, so cp ranks also share the weight memory;
- ``dp_replicate``: size 1 (HSDP, replicate across nodes and shard within, is not built yet).

The process group is started either by ``torchrun`` (``init_from_env``: env://) or by the Ray
trainer workers (``init_tcp``: rank 0's ``tcp://IP:PORT``); both end in :func:`_make`.
Without FSDP, gradients are summed by :func:`all_reduce_grads` (one collective per tensor).
With FSDP the reduce-scatter inside backward sums them (divide factor 1: the losses are already
normalised by the global token count), and ``training.loss.in_root`` runs the loss through the
root module's FSDP hooks so the LM head (which the chunked loss uses outside ``forward``) is
gathered too.
"""

from __future__ import annotations

import logging
import os
import types
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from posttrain.errors import ConfigError
from posttrain.training.config import FsdpConfig
from posttrain.training.loss import FSDP_ROOT_METHOD, trunk_and_head

log = logging.getLogger(__name__)

MESH_DIMS = ("dp_replicate", "dp_shard", "cp")


@dataclass(frozen=True)
class Parallel:
    """This process's place: ``rank`` of ``world``; collective tensors live on ``device``."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"  # "cpu" (gloo) or "cuda:N" (nccl)
    cp: int = 1
    mesh: Any = None  # DeviceMesh over MESH_DIMS; None in a single process

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def dp_size(self) -> int:
        """Data-parallel ranks (each a different share of the batch)."""
        return self.world // self.cp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.cp  # cp is the innermost mesh dim

    def cp_group(self) -> Any:
        """The process group of this rank's context-parallel peers (None in a single process)."""
        return self.mesh["cp"].get_group() if self.mesh is not None else None

    def shard_mesh(self) -> Any:
        """The (sub)mesh FSDP shards over: ``dp_shard``, or ``dp_shard x cp`` flattened when cp > 1."""
        if self.cp == 1:
            return self.mesh["dp_shard"]
        return self.mesh["dp_shard", "cp"]._flatten("dp_shard_cp")


def build_mesh(world: int, cp: int = 1, device_type: str = "cpu") -> Any:
    """``(dp_replicate, dp_shard, cp)`` = ``(1, world // cp, cp)`` over the initialised group."""
    from torch.distributed.device_mesh import init_device_mesh

    if cp < 1 or world % cp:
        raise ValueError(f"the context-parallel size must divide the number of processes (cp={cp}, world={world})")
    return init_device_mesh(device_type, (1, world // cp, cp), mesh_dim_names=MESH_DIMS)


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _make(cp: int) -> Parallel:
    backend = dist.get_backend()
    device = "cpu"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", dist.get_rank() % torch.cuda.device_count())))
        device = f"cuda:{torch.cuda.current_device()}"
    world = dist.get_world_size()
    mesh = build_mesh(world, cp, "cuda" if backend == "nccl" else "cpu")
    return Parallel(rank=dist.get_rank(), world=world, device=device, cp=cp, mesh=mesh)


def check_context_parallel(cp: int, world: int) -> None:
    """Raise ConfigError unless ``cp`` (``train.context_parallel``) divides the ``world`` processes."""
    if cp < 1 or world % cp:
        raise ConfigError(f"train.context_parallel={cp} must divide the number of processes ({world}): launch a "
                          f"multiple of {cp} processes (torchrun --nproc_per_node) or set train.context_parallel "
                          f"to a divisor of {world}")


def init_from_env(cp: int = 1) -> Parallel:
    """torchrun sets WORLD_SIZE/RANK (env://); a single process otherwise (no group, no mesh)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_context_parallel(cp, world)  # before joining the group: every rank fails alike, none hangs
    if world == 1:
        return Parallel()
    if not dist.is_initialized():
        dist.init_process_group(_backend())
    return _make(cp)


def init_tcp(address: str, rank: int, world: int, timeout_s: float, cp: int = 1) -> Parallel:
    """Join ``world`` processes at rank 0's ``tcp://IP:PORT`` (the Ray trainer workers; blocks until all joined)."""
    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a torch.distributed group; leave it first")
    dist.init_process_group(_backend(), init_method=address, rank=rank, world_size=world,
                            timeout=timedelta(seconds=timeout_s))
    return _make(cp)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(par: Parallel) -> None:
    if par.world > 1:
        dist.barrier()


# --------------------------------------------------------------------------- collectives


def all_reduce_grads(params: Sequence[torch.nn.Parameter], par: Parallel) -> None:
    """Sum every gradient over the data-parallel ranks (replicated weights, no FSDP). A rank without
    one (an empty share) joins with zeros; a parameter no rank touched keeps ``grad=None``, so AdamW
    skips it as it would in one process."""
    if par.world == 1:
        return
    touched = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=par.device)
    dist.all_reduce(touched)
    pending = []
    for p, hits in zip(params, touched.tolist()):
        if hits == 0:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        pending.append(dist.all_reduce(p.grad, async_op=True))
    for work in pending:
        work.wait()


def all_sum(values: Sequence[float], par: Parallel) -> list[float]:
    if par.world == 1:
        return [float(v) for v in values]
    buf = torch.tensor(list(values), dtype=torch.float64, device=par.device)
    dist.all_reduce(buf)
    return buf.tolist()


def all_max(value: int, par: Parallel) -> int:
    if par.world == 1:
        return value
    buf = torch.tensor([value], dtype=torch.int64, device=par.device)
    dist.all_reduce(buf, op=dist.ReduceOp.MAX)
    return int(buf.item())


def broadcast(t: torch.Tensor, par: Parallel) -> torch.Tensor:
    """Rank 0's ``t`` on every rank (e.g. a shuffle, so no rank relies on its own RNG)."""
    if par.world == 1:
        return t
    buf = t.to(par.device)
    dist.broadcast(buf, src=0)
    return buf.cpu()


def all_gather_objects(obj: Any, par: Parallel) -> list[Any]:
    out: list[Any] = [None] * par.world
    dist.all_gather_object(out, obj)
    return out


# --------------------------------------------------------------------------- FSDP2


def is_sharded(model: Any) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def decoder_layers(model: Any) -> torch.nn.ModuleList:
    trunk, _ = trunk_and_head(model)
    layers = getattr(trunk, "layers", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(f"train.fsdp.enabled: {type(trunk).__name__} has no 'layers' list of decoder blocks to "
                          "shard; set train.fsdp.enabled=false for this model")
    return layers


def shard_model(model: Any, par: Parallel, cfg: FsdpConfig) -> Any:
    """FSDP2: ``fully_shard`` each decoder block, then the root (embeddings, final norm, LM head).

    Call after LoRA and freezing (frozen parameters are sharded too, they just get no gradient)
    and before building the optimizer (it must see the sharded parameters). On GPU parameters are
    gathered in bf16 and gradients reduced in fp32; on CPU everything stays fp32. Gradients are
    *summed* over ranks (divide factor 1): every loss here is already divided by the global count.
    """
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
    from torch.distributed.fsdp import register_fsdp_forward_method

    if par.mesh is None:
        return model  # one process: nothing to shard (checkpoints still use the sharded format)
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if par.device.startswith("cuda") else MixedPrecisionPolicy())  # CPU: fp32 throughout
    on_gpu = par.device.startswith("cuda")
    if cfg.cpu_offload and not on_gpu:
        log.warning("train.fsdp.cpu_offload has no effect on CPU (everything already lives in host memory)")
    kwargs = dict(mesh=par.shard_mesh(), mp_policy=mp,
                  offload_policy=CPUOffloadPolicy() if cfg.cpu_offload and on_gpu else OffloadPolicy())
    for layer in decoder_layers(model):
        fully_shard(layer, reshard_after_forward=cfg.reshard_after_forward, **kwargs)
    fully_shard(model, reshard_after_forward=cfg.reshard_after_forward, **kwargs)
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)  # plain SUM: gloo has no PREMUL_SUM
            # MoE experts no token of this rank reached have no grad here but may elsewhere: reduce zeros,
            # or the ranks' reduce-scatters would not match (one untouched by every rank then steps with a
            # zero gradient, where one process would skip it: only AdamW's decay of old moments differs)
            module.set_reduce_scatter_unused_params(True, recurse=False)
    setattr(model, FSDP_ROOT_METHOD, types.MethodType(lambda self, fn, *args: fn(*args), model))
    register_fsdp_forward_method(model, FSDP_ROOT_METHOD)
    return model


def grad_norm(params: Sequence[torch.nn.Parameter], max_norm: float | None) -> float:
    """Clip to ``max_norm`` (None: no clip) and return the total norm (sharded gradients: the global norm)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm is not None else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return float(norm)
