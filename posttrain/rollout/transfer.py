"""Direct weight sync through vLLM's weight-transfer engines (``rollout.sync_transport`` nccl | ipc | gloo).

The ``shm`` transport stages safetensors in /dev/shm and each engine reloads them. Here the trainer
broadcasts its tensors straight into the engines' models instead, with vLLM's own control plane
(``init_weight_transfer_engine`` / ``start_weight_update`` / ``update_weights`` /
``finish_weight_update`` on every engine worker, layerwise reload around the receive):

    trainer rank 0 (sender, group rank 0) --broadcast--> engine e's vLLM workers (ranks 1 + e*w ..)

- ``nccl``: vLLM's NCCL engines (GPU trainer and GPU engines; no copy through host memory; one GPU per rank).
- ``ipc``: vLLM's CUDA IPC engines, for a trainer and engines that share a GPU (``run.colocate``, or
  fractional ``train.num_gpus`` / ``rollout.gpus_per_engine``): the engines read the trainer's tensors in place.
- ``gloo``: the same handshake and layerwise reload over a torch gloo group, for CPU engines: how this
  path is proven on a machine without GPUs, and a real transport for CPU clusters (``transfer_gloo``).

vLLM's trainer engine drives one vLLM instance's workers; :class:`EngineClient` fans its calls out to
our ``rollout-N`` actors and gives each engine's workers their own ranks. LoRA adapters stay on ``shm``
(megabytes: staging costs nothing next to a full model).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import ParamMeta, TrainerInitInfo, WeightSource
from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

from posttrain.rollout.types import EngineCrashedError, EngineTimeoutError, WeightUpdate

DIRECT = ("nccl", "ipc", "gloo")  # transports that send straight into the engines (shm stages files)


class TrainerWeights(WeightSource):
    """The trainer's weights as vLLM's engines load them: ``named()`` yields ``(HF name, full tensor)``
    (a collective on a sharded trainer: every rank iterates in step), cast to the engines' dtype on
    the way (an fp32 trainer sends bf16 engines half the bytes)."""

    def __init__(self, named: Callable[[], Iterator[tuple[str, torch.Tensor]]],
                 meta: list[tuple[str, torch.dtype, tuple[int, ...]]], dtype: torch.dtype | None) -> None:
        self._named, self._dtype = named, dtype
        self._meta = [ParamMeta(name, dtype or dt, tuple(shape)) for name, dt, shape in meta]

    def metadata(self) -> list[ParamMeta]:
        return self._meta

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in self._named():
            yield name, tensor if self._dtype is None else tensor.to(self._dtype)


class EngineClient:
    """vLLM's ``VLLMWeightSyncClient`` over our rollout actors: each call goes to every engine and waits
    for all; at the handshake engine ``e``'s workers get ranks ``1 + e * workers_per_engine ..``."""

    def __init__(self, handles: list[Any], workers_per_engine: int, timeout_s: float) -> None:
        self.handles, self.workers, self.timeout = handles, workers_per_engine, timeout_s

    def _all(self, step: str, payload: list[Any] | None = None) -> None:
        """Raises :class:`EngineCrashedError` when an engine died (the controller restarts the engines and
        reconnects), :class:`EngineTimeoutError` past the deadline; an engine's own error as it is."""
        import ray

        args = payload or [None] * len(self.handles)
        try:
            ray.get([h.weight_transfer.remote(step, a) for h, a in zip(self.handles, args)], timeout=self.timeout)
        except ray.exceptions.RayActorError as exc:
            raise EngineCrashedError(f"a rollout engine died during the weight transfer ({step}): {exc}") from None
        except ray.exceptions.GetTimeoutError:
            raise EngineTimeoutError(f"weight transfer ({step}): the engines gave no answer within "
                                     f"{self.timeout:g} s (rollout.call_timeout_s)") from None

    def dead(self) -> list[int]:
        """Indices of engines that no longer answer (after a failed transfer: was it them?)."""
        import ray

        out = []
        for i, h in enumerate(self.handles):
            try:
                ray.get(h.info.remote(), timeout=30)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                out.append(i)
        return out

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        if "rank_offset" not in init_info:  # IPC: no group, nothing to number
            return self._all("init_weight_transfer_engine", [init_info] * len(self.handles))
        first = init_info["rank_offset"]
        self._all("init_weight_transfer_engine",
                  [{**init_info, "rank_offset": first + e * self.workers} for e in range(len(self.handles))])

    def start_weight_update(self) -> None:
        self._all("start_weight_update")

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self._all("update_weights", [update_info] * len(self.handles))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all("finish_weight_update")

    def shutdown_weight_transfer_engine(self) -> None:
        self._all("shutdown_weight_transfer_engine")


def endpoint() -> tuple[str, int]:
    """Where the sender's rendezvous listens: this node's address and a free port."""
    import socket

    import ray

    with socket.socket() as sock:
        sock.bind(("", 0))
        port = sock.getsockname()[1]
    return (ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"), port


class DirectSender:
    """The trainer's end, opened once per engine pool (again after the engines restart): each
    :meth:`send` broadcasts the current weights into every engine and returns the update's handle.

    ``named``/``meta``: the weights as ``(name, full tensor)`` and their ``(name, dtype, shape)``,
    in the same order; ``rank``: this trainer worker's (0 sends; a sharded trainer's others join
    the gathers); ``dtype``: the engines' (None: as trained)."""

    def __init__(self, transport: str, handles: list[Any], workers_per_engine: int, where: tuple[str, int],
                 rank: int, named: Callable[[], Iterator[tuple[str, torch.Tensor]]],
                 meta: list[tuple[str, torch.dtype, tuple[int, ...]]], dtype: torch.dtype | None,
                 timeout_s: float) -> None:
        if transport not in DIRECT:
            raise ValueError(f"no direct weight transfer {transport!r} (have: {', '.join(DIRECT)})")
        self.transport = transport
        source = TrainerWeights(named, meta, dtype)
        self.num_tensors = len(meta)
        self.num_bytes = sum(m.dtype.itemsize * math.prod(m.shape) for m in source.metadata())
        world_size = 1 + len(handles) * workers_per_engine
        if transport == "gloo":
            from posttrain.rollout.transfer_gloo import GlooTrainerInitInfo, register_gloo

            register_gloo()
            info: TrainerInitInfo = GlooTrainerInitInfo(*where, world_size, rank=rank)
        elif transport == "ipc":
            from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

            info = IPCTrainerInitInfo(rank=rank)
        else:
            info = NCCLTrainerInitInfo(*where, world_size, rank=rank)
        self.client = EngineClient(handles, workers_per_engine, timeout_s)
        self.engine = WeightTransferTrainerFactory.trainer_init(info, client=self.client, source=source)
        self.sends = 0

    def send(self, policy_version: int) -> WeightUpdate:
        try:
            with torch.no_grad():
                self.engine.send_weights()
        except (EngineCrashedError, EngineTimeoutError):
            raise
        except Exception as exc:  # a broken group: an engine dying mid-broadcast shows as a gloo/NCCL error
            if dead := self.client.dead():
                raise EngineCrashedError(f"rollout engine(s) {dead} died during the weight transfer: {exc}") from exc
            raise
        self.sends += 1
        return WeightUpdate(kind="full", transport=self.transport, path="", version=self.sends,
                            num_bytes=self.num_bytes, num_tensors=self.num_tensors, policy_version=policy_version)

    def close(self) -> None:
        self.engine.shutdown()
