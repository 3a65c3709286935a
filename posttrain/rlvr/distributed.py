"""Data-parallel plumbing of the policy trainer: the process group, row shards, summed gradients.

W trainer workers each train a token-balanced share of every (mini)batch and sum their
gradients before clipping and the optimizer step, so all W hold the same weights and make the
update one worker would make on the whole batch (up to float summation order).
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    """This worker's place in the group; tensors for collectives live on ``device``."""

    rank: int
    size: int
    device: str  # "cpu" (gloo) or "cuda:N" (nccl)


def rendezvous_address() -> str:
    """``tcp://IP:PORT``: a free port on this node, where rank 0 will listen for the others."""
    import ray

    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    return f"tcp://{ray.util.get_node_ip_address()}:{port}"


def join(address: str, rank: int, size: int, timeout_s: float) -> World:
    """Join the group (blocks until all ``size`` workers have): nccl on CUDA, gloo on CPU."""
    if dist.is_initialized():
        raise RuntimeError("this process already belongs to a torch.distributed group; leave it first")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend, init_method=address, rank=rank, world_size=size,
                            timeout=timedelta(seconds=timeout_s))
    device = f"cuda:{torch.cuda.current_device()}" if backend == "nccl" else "cpu"
    return World(rank, size, device)


def leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard_rows(rows: Sequence[int], lengths: Sequence[int], size: int) -> list[list[int]]:
    """``rows`` split into ``size`` shards of about equal tokens (``lengths[row]``): longest row
    first onto the lightest shard, ties to the lower rank. Depends only on its arguments, so every
    rank computes the same split; a shard may be empty when there are fewer rows than workers."""
    if size == 1:
        return [list(rows)]
    shards: list[list[int]] = [[] for _ in range(size)]
    load = [0] * size
    for row in sorted(rows, key=lambda r: (-lengths[r], r)):
        k = min(range(size), key=lambda i: (load[i], i))
        shards[k].append(row)
        load[k] += lengths[row]
    return [sorted(s) for s in shards]


def broadcast(t: torch.Tensor, world: World) -> torch.Tensor:
    """Rank 0's ``t`` on every rank (e.g. the minibatch shuffle, so no rank relies on its own RNG)."""
    buf = t.to(world.device)
    dist.broadcast(buf, src=0)
    return buf.cpu()


def all_sum(values: Sequence[float], world: World) -> list[float]:
    buf = torch.tensor(list(values), dtype=torch.float64, device=world.device)
    dist.all_reduce(buf)
    return buf.tolist()


def all_gather_objects(obj: Any, world: World) -> list[Any]:
    out: list[Any] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_grads(params: Sequence[torch.nn.Parameter], world: World) -> None:
    """Sum every gradient over the group. A rank without one (empty shard) joins with zeros; a
    parameter no rank touched keeps ``grad=None``, so AdamW skips it as it would on one worker."""
    touched = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=world.device)
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
