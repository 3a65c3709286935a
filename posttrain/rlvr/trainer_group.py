"""``TrainerGroup``: the controller's handle on W policy-trainer workers (data parallel).

Starts ``trainer-0 .. trainer-{W-1}`` (one :class:`PolicyTrainer` actor each) and joins them in
one torch.distributed group (gloo on CPU, nccl on CUDA). Every worker receives the whole batch
and trains its token-balanced share; gradients are summed before the optimizer step, so all
workers hold the same weights and rank 0 alone answers for them (weights for the engines, the
logprob check, checkpoints). The API is the single trainer actor's, made synchronous.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from posttrain.orchestration import cluster
from posttrain.rlvr.async_rollouts import trainer_cores

if TYPE_CHECKING:
    from posttrain.orchestration.placement import StagePlacement
    from posttrain.rlvr.batch import TrainBatch
    from posttrain.rlvr.config import RLVRConfig
    from posttrain.rollout.types import WeightUpdate

log = logging.getLogger(__name__)


class TrainerGroup:
    """trainer-0..trainer-{W-1}: one PolicyTrainer actor per worker in one torch.distributed group
    (gloo on CPU, nccl on CUDA). Same synchronous API as the old single actor calls."""

    def __init__(self, cfg: RLVRConfig, *, placement: StagePlacement | None = None) -> None:
        """``placement``: a StagePlacement with a ``trainer`` bundle per worker (else Ray places them).
        ``cfg.timeouts.trainer_call_s`` bounds every call (and each collective inside the group)."""
        # imported here: torch and transformers stay out of the controller
        from posttrain.rlvr.trainer import PolicyTrainer

        cluster.init_ray()
        self.timeout_s = timeout_s = cfg.timeouts.trainer_call_s
        size = cfg.train.workers
        self.names = [f"trainer-{rank}" for rank in range(size)]
        self.actors: list[Any] = []
        self._joined = False
        # sharded weights (train.fsdp): every call that reads them is a collective, all workers take part
        self._sharded = cfg.train.fsdp.enabled and size > 1
        try:
            for rank, name in enumerate(self.names):
                slot = placement.slot("trainer", rank) if placement is not None else None
                self.actors.append(cluster.start_actor(
                    PolicyTrainer, name, cfg.start_model(), cfg.train, cfg.lora, cfg.loss_config(), cfg.run.seed,
                    trainer_cores(cfg, rank), num_cpus=cfg.train.num_cpus, num_gpus=cfg.train.num_gpus, placement=slot))
            if size > 1:
                address = self._rank0("group_address", what="start-up")
                self._wait([a.join_group.remote(address, rank, size, timeout_s) for rank, a in enumerate(self.actors)],
                           "joining the process group")
                self._joined = True
        except BaseException:
            self.shutdown()
            raise

    # ----------------------------------------------------------------- the trainer's API

    def resume(self, run_dir: str) -> dict[str, Any] | None:
        """Every worker loads the newest checkpoint; rank 0's saved state (None when there is none)."""
        return self._all("resume", run_dir, what="resume")[0]

    def train_step(self, batch: TrainBatch, temperature: float) -> dict[str, float]:
        """One RL step over the group; metrics are already combined over workers (rank 0's copy)."""
        import ray

        ref = ray.put(batch)  # one copy in the object store, read by every worker
        return self._all("train_step", ref, temperature, what="train step")[0]

    def publish_weights(self, sync_dir: str) -> WeightUpdate:
        return self._weights_call("publish_weights", sync_dir, what="publish weights")

    def open_transfer(self, pool: Any, rollout: Any, dtype: str) -> None:
        """Direct weight sync into ``pool``'s engines (``rollout.sync_transport`` nccl/gloo): rank 0 listens,
        the engines join it; a sharded trainer's other ranks join the gathers. Again after engines restart."""
        where = self._rank0("transfer_endpoint", what="transfer endpoint")
        workers = max(1, int(rollout.gpus_per_engine))  # vLLM workers per engine (tensor parallel)
        args = (rollout.sync_transport, pool.actors, workers, where, dtype, rollout.call_timeout_s)
        if self._sharded:
            self._all("open_transfer", *args, what="weight-transfer rendezvous")
        else:
            self._rank0("open_transfer", *args, what="weight-transfer rendezvous")

    def send_weights(self) -> WeightUpdate:
        return self._weights_call("send_weights", what="weight transfer")

    def offload_optimizer(self) -> None:
        self._all("offload_optimizer", what="optimizer offload")

    def load_optimizer(self) -> None:
        self._all("load_optimizer", what="optimizer reload")

    def staged_files_ref(self, update: WeightUpdate) -> Any:
        """A Ray ObjectRef of the update's files, staged on rank 0's node (not fetched here)."""
        return self.actors[0].staged_files.remote(update)

    def reference_logprobs(self, token_ids: list[int], start: int) -> list[float]:
        return self._weights_call("reference_logprobs", token_ids, start, what="logprob check")

    def save(self, run_dir: str, step: int, extra: dict[str, Any], keep_last: int) -> str:
        """Rank 0 writes the checkpoint (every worker holds the same weights and optimizer state), or,
        sharded, every worker writes its shard."""
        return self._weights_call("save", run_dir, step, extra, keep_last, what="checkpoint")

    def export(self, folder: str) -> str:
        """The final model as an HF folder (LoRA merged), written atomically by rank 0 (sharded:
        gathered one tensor at a time by all workers)."""
        return self._weights_call("export", folder, what="export")

    def shutdown(self) -> None:
        """Leave the process group (best effort: a dead worker cannot) and stop every worker."""
        if self._joined:
            try:
                self._all("leave_group", what="leaving the process group", timeout_s=60)
            except Exception as exc:  # noqa: BLE001 - the workers are killed next anyway
                log.warning("trainer group: %s", exc)
            self._joined = False
        for actor in self.actors:
            cluster.kill_actor(actor)
        self.actors = []

    def __enter__(self) -> TrainerGroup:  # noqa: PYI034 - Python 3.10 has no typing.Self
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ----------------------------------------------------------------- calls

    def _weights_call(self, method: str, *args: Any, what: str) -> Any:
        """Rank 0's answer; sharded, every worker runs the call (it gathers) and rank 0's answer counts."""
        return self._all(method, *args, what=what)[0] if self._sharded else self._rank0(method, *args, what=what)

    def _rank0(self, method: str, *args: Any, what: str) -> Any:
        return self._wait([getattr(self.actors[0], method).remote(*args)], what)[0]

    def _all(self, method: str, *args: Any, what: str, timeout_s: float | None = None) -> list[Any]:
        return self._wait([getattr(a, method).remote(*args) for a in self.actors], what, timeout_s)

    def _wait(self, refs: list[Any], what: str, timeout_s: float | None = None) -> list[Any]:
        """One result per worker (``refs[i]`` from ``trainer-i``). The first worker to fail or die is
        named at once: the others would otherwise sit in a collective until the deadline."""
        import ray

        timeout_s = timeout_s or self.timeout_s
        name_of = dict(zip(refs, self.names))
        deadline = time.monotonic() + timeout_s
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                raise cluster.ActorTimeoutError(
                    f"{', '.join(name_of[r] for r in pending)}: {what} gave no answer within {timeout_s:g} s "
                    "(hung or overloaded; raise the trainer group's timeout_s if the work is just big)")
            cluster.gather(ready, [name_of[r] for r in ready], timeout_s, what)  # raises, naming the worker
        return cluster.gather(refs, [name_of[r] for r in refs], timeout_s, what)
