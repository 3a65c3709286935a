"""``gloo``, a vLLM weight-transfer backend for CPU engines (``rollout.sync_transport=gloo``).

The NCCL backend's handshake and layerwise reload, with a torch gloo group of its own in place of the
NCCL communicator: the trainer's rank 0 broadcasts each tensor, every engine worker receives it and loads
it into its model. Registered in vLLM's factories by :func:`register_gloo` (before an engine starts: its
workers build their transfer engine from the registry).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any, ClassVar

import torch
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
)
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory
from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferUpdateInfo

_TIMEOUT = timedelta(minutes=10)


@dataclass(kw_only=True)
class GlooInitInfo(WeightTransferInitInfo):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = "gloo"

    master_address: str
    master_port: int
    world_size: int


def _gloo_group(address: str, port: int, rank: int, world_size: int) -> Any:
    """A gloo group of its own (no default process group needed: vLLM's workers have theirs)."""
    from torch.distributed import PrefixStore, ProcessGroupGloo, TCPStore

    store = TCPStore(address, port, world_size, is_master=rank == 0, timeout=_TIMEOUT)
    return ProcessGroupGloo(PrefixStore("posttrain-weights", store), rank, world_size, _TIMEOUT)


def _broadcast(group: Any, tensor: torch.Tensor) -> None:
    from torch.distributed import BroadcastOptions

    options = BroadcastOptions()
    options.rootRank = 0
    group.broadcast([tensor], options).wait()


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, NCCLWeightTransferUpdateInfo]):
    """Worker side: receive each tensor by broadcast and load it, inside vLLM's layerwise reload."""

    init_info_cls = GlooInitInfo
    update_info_cls = NCCLWeightTransferUpdateInfo

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.group: Any = None

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        rank = init_info.rank_offset + self.parallel_config.rank
        self.group = _gloo_group(init_info.master_address, init_info.master_port, rank, init_info.world_size)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        """As the base class, without its device synchronise (CPU workers have no accelerator to wait for)."""
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: NCCLWeightTransferUpdateInfo) -> None:
        if self.group is None:
            raise RuntimeError("gloo weight transfer not initialised: init_weight_transfer_engine first")
        for name, dtype, shape in zip(update_info.names, update_info.dtype_names, update_info.shapes):
            weight = torch.empty(shape, dtype=getattr(torch, dtype))
            _broadcast(self.group, weight)
            self.model.load_weights([(name, weight)])

    def shutdown(self) -> None:
        self.group = None


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """Trainer side: rank 0 opens the group and broadcasts while the engines receive."""

    init_info_cls = GlooTrainerInitInfo

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client: Any, source: WeightSource | None = None
                     ) -> GlooTrainerWeightTransferEngine:
        engine = cls(client=client, source=source, is_sender=init_info.is_sender)
        engine.group = None
        if engine.is_sender:  # the engines block in their handshake until the group is complete
            worker = GlooInitInfo(master_address=init_info.master_address, master_port=init_info.master_port,
                                  rank_offset=1, world_size=init_info.world_size)
            with ThreadPoolExecutor(max_workers=1) as pool:
                joined = pool.submit(client.init_weight_transfer_engine, asdict(worker))
                engine.group = _gloo_group(init_info.master_address, init_info.master_port, 0, init_info.world_size)
                joined.result()
        return engine

    def send_weights(self) -> None:
        assert self.source is not None
        meta = self.source.metadata()
        if not self.is_sender:
            for _ in self.source:  # the gathers are collectives: join them
                pass
            return
        info = NCCLWeightTransferUpdateInfo(names=[m.name for m in meta],
                                            dtype_names=[str(m.dtype).removeprefix("torch.") for m in meta],
                                            shapes=[list(m.shape) for m in meta])
        self.client.start_weight_update()
        pool = ThreadPoolExecutor(max_workers=1)
        try:
            received = pool.submit(self.client.update_weights, asdict(info))
            sent = 0
            for name, tensor in self.source:
                expected = meta[sent] if sent < len(meta) else None
                if expected is None or (name, tensor.dtype, tuple(tensor.shape)) != (expected.name, expected.dtype, expected.shape):
                    raise ValueError(f"weight {sent}: declared {expected}, sending {name} {tensor.dtype} "
                                     f"{tuple(tensor.shape)}: metadata and iteration must agree")
                _broadcast(self.group, tensor.detach().contiguous())
                sent += 1
            if sent != len(meta):
                raise ValueError(f"sent {sent} weights of the {len(meta)} declared; the engines wait for the rest")
            received.result()
        finally:
            pool.shutdown(wait=False)  # after a failed broadcast the receivers never return
        self.client.finish_weight_update()

    def shutdown(self) -> None:
        self.group = None


_registered = threading.Lock()


def register_gloo() -> None:
    """Make ``gloo`` a vLLM weight-transfer backend in this process (engine and trainer side; idempotent)."""
    with _registered:
        if "gloo" not in WeightTransferEngineFactory._registry:
            WeightTransferEngineFactory.register_engine("gloo", GlooWeightTransferEngine)
        if "gloo" not in WeightTransferTrainerFactory._registry:
            WeightTransferTrainerFactory.register_engine("gloo", GlooTrainerWeightTransferEngine)
