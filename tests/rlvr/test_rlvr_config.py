"""RLVR config: presets load, GRPO preconditions are errors that name the key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.config import ConfigError, load_config
from posttrain.rlvr.config import RLVRConfig

PRESETS = sorted((Path(__file__).parents[2] / "configs" / "rlvr").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=[p.stem for p in PRESETS])
def test_presets_load(preset):
    cfg = load_config(RLVRConfig, preset)
    assert cfg.rollout.samples_per_prompt >= 2


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("rollout.samples_per_prompt=1", "samples_per_prompt must be >= 2 for GRPO"),
        ("generation.temperature=0", "temperature must be > 0"),
        ("environments=[]", "at least one environment"),
        ("algorithm.variant=ppo", "algorithm.variant = 'ppo'"),
        ("algorithm.eps_lo=0.1", "did you mean 'eps_low'"),
        ('environments=[{name: math}, {name: math}]', "distinct names"),
        ("run.colocate=true", "set train.num_gpus and rollout.gpus_per_engine"),
        ("train.offload_optimizer=true", "set run.colocate=true"),
        ("rollout.sync_transport=nccl", "sends GPU to GPU"),
        ("rollout.sync_transport=ipc", "sends GPU to GPU"),
        ("run.segment_tokens=8", "set run.max_staleness >= 1"),
    ],
)
def test_bad_configs(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        load_config(RLVRConfig, overrides=[override])


def test_direct_weight_sync_takes_full_weights_only():
    cfg = load_config(RLVRConfig, overrides=["rollout.sync_transport=gloo"])
    assert cfg.rollout.sync_transport == "gloo"
    with pytest.raises(ConfigError, match="LoRA adapter is staged through shm"):
        load_config(RLVRConfig, overrides=["rollout.sync_transport=gloo", "lora.enabled=true"])


def test_colocation_needs_gpus_and_no_overlap():
    gpus = ["run.colocate=true", "train.num_gpus=0.5", "rollout.gpus_per_engine=0.5"]
    cfg = load_config(RLVRConfig, overrides=[*gpus, "train.offload_optimizer=true"])
    assert cfg.run.colocate and cfg.train.offload_optimizer
    with pytest.raises(ConfigError, match="cannot overlap"):
        load_config(RLVRConfig, overrides=[*gpus, "run.max_staleness=1"])


def test_cli_dry_run(capsys, monkeypatch):
    from posttrain.environments import registry

    loads: list[str] = []
    real = registry.load_environment
    monkeypatch.setattr(registry, "load_environment", lambda cfg: loads.append(cfg.name) or real(cfg))
    cfg = load_config(RLVRConfig, PRESETS[0])
    assert main(["rlvr", "--config", str(PRESETS[0]), "run.steps=3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "steps: 3" in out and "variant: nano" in out and "placement total:" in out
    assert sorted(loads) == sorted(e.name for e in cfg.environments)  # each built once, for data check and placement


def test_algorithm_config_imports_without_torch_and_is_the_one_the_loss_uses():
    code = ("import sys; import posttrain.rlvr.config as c; "
            "assert not [m for m in sys.modules if m.split('.')[0] == 'torch'], 'torch imported'; "
            "import posttrain.rlvr.policy_loss as p, posttrain.rlvr.advantages as a; "
            "assert p.LossConfig is c.LossConfig; "
            "assert a.Baseline is c.Baseline and a.Scale is c.Scale")
    subprocess.run([sys.executable, "-c", code], check=True)
