"""Rollout test set-up: a vLLM-CPU-compatible tiny model, a private Ray cluster, leak checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

RAY_TEMP_DIR = "/tmp/ray-rollout"


def _shm() -> set[str]:
    return {p.name for pattern in ("psm_*", "posttrain-sync-*") for p in Path("/dev/shm").glob(pattern)}


@pytest.fixture(scope="module")
def ray_cluster():
    """A private local Ray per test module (own temp dir, loopback), shut down after it, so no
    Ray is left running for other test folders."""
    os.environ.setdefault("VLLM_CACHE_ROOT", "/tmp/rollout-vllm-cache")
    from posttrain.orchestration import cluster

    before = _shm()
    cluster.init_ray(temp_dir=RAY_TEMP_DIR, num_cpus=4)
    yield
    cluster.shutdown_ray()
    leaked = _shm() - before
    assert not leaked, f"shared-memory segments leaked by rollout engines: {sorted(leaked)}"
