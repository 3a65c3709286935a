"""scripts/gpu_smoke.sh: refuses at once without CUDA, its parts run (on CPU, small) and report
failures without stopping; on a GPU every part passes or says what it lacks (``gpu`` marker)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_smoke.py"


def _smoke_module():
    spec = importlib.util.spec_from_file_location("gpu_smoke", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_refuses_at_once_without_cuda() -> None:
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_smoke.sh")], capture_output=True, text=True,
                          env={**os.environ, "PYTHON": sys.executable}, timeout=120)
    assert done.returncode == 3
    assert "no CUDA device" in done.stderr and "| part |" not in done.stdout


def test_self_check_runs_the_torch_parts_on_cpu(tmp_path) -> None:
    out = tmp_path / "rows.json"
    done = subprocess.run([sys.executable, str(SCRIPT), "--self-check-on-cpu", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    rows = {r["part"]: r for r in json.loads(out.read_text())}
    assert {p for p, r in rows.items() if r["status"] == "ok"} == {
        "environment", "chunked_loss", "cp_attention", "sft_step", "hf_generate"}
    assert {rows[p]["status"] for p in ("vllm_generate", "vllm_sleep_wake", "rlvr_two_steps", "rlvr_colocated")} == {
        "skipped"}
    assert "| sft_step | ok |" in done.stdout


def test_a_failing_part_is_reported_and_the_rest_still_run() -> None:
    smoke = _smoke_module()

    def fine() -> dict:
        return {"x": 1}

    def broken() -> dict:
        raise RuntimeError("kernel exploded")

    def lacking() -> dict:
        smoke._need("a_package_that_is_not_installed")
        return {}

    rows = smoke.run_parts([broken, fine, lacking])
    assert [r["status"] for r in rows] == ["FAILED", "ok", "skipped"]
    assert "kernel exploded" in rows[0]["reason"] and "a_package_that_is_not_installed" in rows[2]["reason"]
    assert "| broken | FAILED |" in smoke.table(rows)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_part_passes_on_cuda(tmp_path) -> None:
    out = tmp_path / "rows.json"
    done = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_smoke.sh"), "--json", str(out)],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert all(r["status"] in ("ok", "skipped") for r in json.loads(out.read_text()))
