"""RLHF and GenRM training are the RLVR loop with other environments: end to end on tiny-llama
through real Ray actors and real vLLM engines (the policy's rollout-0 and the judge's genrm-0)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from posttrain.config import load_config
from posttrain.genrm.config import GenRMTrainConfig, RLHFConfig
from posttrain.orchestration import cluster

HERE = Path(__file__).parent
CONFIGS = HERE.parents[1] / "configs"


@pytest.fixture(autouse=True)
def _ray_down():
    yield
    cluster.shutdown_ray()


def test_rlhf_step_with_a_local_genrm_mixed_with_math(tmp_path, tiny_llama_dir):
    from posttrain.rlvr.loop import main

    cfg = load_config(RLHFConfig, CONFIGS / "rlhf" / "tiny_smoke.yaml", [f"run_dir={tmp_path}"])
    last = main(cfg, stage="rlhf")
    # prompts_per_step=2 over two environments: one genrm prompt x 4 rollouts -> circular = 4 judge calls,
    # all in one batch
    assert last["env/genrm/calls"] == 4.0
    assert 0.0 <= last["env/genrm/parse_failure_rate"] <= 1.0 and "env/genrm/raw_reward" in last
    assert "env/math/reward" in last
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["stage"] == "rlhf" and rows[-1]["step"] == 1


def test_rlhf_against_a_judge_server_that_is_down_exits_2_naming_it(tmp_path, tiny_llama_dir, capsys):
    """Before: exit 0 after 35 s, every reward 0.5, nothing trained. Now: the probe fails before any
    engine starts or step runs."""
    import socket

    from posttrain.cli import main

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    code = main(["rlhf", "--config", str(CONFIGS / "rlhf" / "tiny_smoke.yaml"), f"run_dir={tmp_path}",
                 "run.dashboard=false",
                 "environments=[{name: genrm, options: {size: 4, judge: {backend: openai, base_url: " + url
                 + ", max_retries: 1, retry_backoff_s: 0.01}}}]"])
    err = capsys.readouterr().err
    assert code == 2 and f"the judge at {url} does not answer (connection" in err
    metrics = tmp_path / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip()  # no step ran, nothing was logged


@pytest.mark.slow
def test_genrm_train_warmup_then_rl(tmp_path, tiny_llama_dir):
    from posttrain.genrm.train import train

    cfg = load_config(GenRMTrainConfig, CONFIGS / "genrm" / "tiny_smoke.yaml", [f"run_dir={tmp_path}"])
    last = train(cfg)
    assert (tmp_path / "warmup" / "model" / "config.json").is_file()
    assert "env/genrm_preference/reward" in last and "env/genrm_preference/format_error" in last
    resolved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert resolved["init_from"] == str(tmp_path / "warmup" / "model")  # RL starts from the warm-up
    assert (tmp_path / "checkpoints" / "step-00000001").is_dir()
    # the judge's held-out quality, before (the base model) and after (the trained judge), both orders
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    judged = [r for r in rows if "eval/genrm_judge/pairwise_accuracy_both_orders" in r]
    assert [r["step"] for r in judged] == [0, 1]
    assert all(r["eval/genrm_judge/prompts"] == 8 and 0 <= r["eval/genrm_judge/pairwise_accuracy_both_orders"] <= 1
               for r in judged)
    train(cfg, resume=True)  # a finished stage run again judges nothing twice
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "eval/genrm_judge/prompts" in r]) == 2


def seeded_rlhf(run_dir: Path, steps: int) -> RLHFConfig:
    """RLHF on tiny-llama judged by a deterministic stand-in GenRM (tests/genrm/seeded_judge.py)."""
    return load_config(RLHFConfig, CONFIGS / "rlhf" / "tiny_smoke.yaml", [
        f"run_dir={run_dir}", f"run.steps={steps}",
        'environments=[{name: "seeded_judge:seeded_genrm", options: {size: 8, judge: {model: seeded}}}]'])


def weights(run_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "checkpoints" / f"step-{step:08d}" / "model" / "model.safetensors")


@pytest.mark.slow
def test_rlhf_resume_matches_uninterrupted_run(tmp_path, tiny_llama_dir, monkeypatch):
    """As RLVR's resume test, with the GenRM's state in the checkpoint: its shuffle RNG and its
    judge's seed counter (a resumed run that forgot them judges step 2 differently)."""
    from posttrain.rlvr.loop import main

    monkeypatch.syspath_prepend(str(HERE))
    main(seeded_rlhf(tmp_path / "straight", 2), stage="rlhf")
    main(seeded_rlhf(tmp_path / "resumed", 1), stage="rlhf")
    main(seeded_rlhf(tmp_path / "resumed", 2), resume=True, stage="rlhf")
    a, b = weights(tmp_path / "straight", 2), weights(tmp_path / "resumed", 2)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    rows = [json.loads(x) for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    straight = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["env/genrm/raw_reward"] == pytest.approx(straight[-1]["env/genrm/raw_reward"])
