"""Two Ray nodes on this machine (``ray.cluster_utils.Cluster``): the trainer and the rollout
engine land on different nodes and an RL step completes, weight sync included -- the path a
real cluster takes (the weights cross nodes through Ray's object store, not /dev/shm)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

from posttrain.config import load_config
from posttrain.rlvr.config import RLVRConfig

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent


@pytest.fixture
def two_nodes(monkeypatch):
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    root = tempfile.mkdtemp(prefix="/tmp/ptmn-")  # short: Ray's socket paths have a length limit
    (Path(root) / "ray").mkdir()
    monkeypatch.setenv("RAY_TMPDIR", root)  # keep both nodes' sessions out of the shared /tmp/ray
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "include_dashboard": False})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, namespace="posttrain")
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_trainer_and_engine_on_different_nodes_complete_a_step(two_nodes, tmp_path, tiny_llama_dir, monkeypatch):
    import ray

    from posttrain.rlvr import actors as actors_mod
    from posttrain.rlvr.loop import main

    seen: dict[str, str] = {}
    real_start = actors_mod.StageActors.start

    def spy(self):  # record where each role's bundle landed, then run the stage as usual
        real_start(self)
        nodes = ray.util.placement_group_table(self.placement.pg)["bundles_to_node_id"]
        for role in ("trainer", "rollout"):
            seen[role] = nodes[self.placement.slot(role, 0).bundle]
        seen["engine reports"] = self.engines.pool.infos[0].node_id

    fetched: list[int] = []
    real_ref = actors_mod.TrainerGroup.staged_files_ref

    def count_fetch(self, update):
        fetched.append(update.version)
        return real_ref(self, update)

    actors_mod.StageActors.start = spy
    monkeypatch.setattr(actors_mod.TrainerGroup, "staged_files_ref", count_fetch)
    try:
        monkeypatch.syspath_prepend(str(HERE / "rlvr"))  # toy_env: a reward a random model can earn
        cfg = load_config(RLVRConfig, HERE.parent / "configs" / "rlvr" / "tiny_smoke.yaml", [
            f"run_dir={tmp_path}", "run.steps=1", "run.prompts_per_step=2", "run.placement_strategy=STRICT_SPREAD",
            'environments=[{name: "toy_env:VowelEnv"}]'])
        last = main(cfg)
    finally:
        actors_mod.StageActors.start = real_start
    assert seen["trainer"] != seen["rollout"] and seen["engine reports"] == seen["rollout"], seen
    assert last["tokens/trained"] > 0
    assert 0 <= last["sync/max_abs_logprob_diff"] < 1e-3  # the engine on the other node got the new weights
    assert len(fetched) == 1  # ... as bytes through Ray's object store, not through the trainer's /dev/shm
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 1
