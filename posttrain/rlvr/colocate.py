"""Colocated RL (``run.colocate``): trainer and engines share the GPUs and take turns.

    engines generate (AdamW state on the host with train.offload_optimizer)
    engines sleep: KV cache freed, weights to host memory (vLLM sleep mode, level 1)
    optimizer state back; the trainer updates; optimizer state to the host
    engines wake: weights back, then the new weights are synced and checked as usual

NeMo-RL runs the Nano recipe this way. Non-colocated (disjoint GPUs, or a CPU box) stays the default.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def trainer_turn(colocate: bool, offload_optimizer: bool, engines: Any, trainer: Any) -> Iterator[dict[str, float]]:
    """Around an update: the GPU goes to the trainer and comes back; yields the swap's metrics
    (``colocate/sleep_s``, ``colocate/wake_s``: the engines' seconds, inside ``time/train_s``)."""
    metrics: dict[str, float] = {}
    if not colocate:
        yield metrics
        return
    metrics["colocate/sleep_s"] = engines.sleep()
    if offload_optimizer:
        trainer.load_optimizer()
    try:
        yield metrics
    finally:
        if offload_optimizer:
            trainer.offload_optimizer()
        metrics["colocate/wake_s"] = engines.wake()
