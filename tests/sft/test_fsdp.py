"""FSDP2 SFT on 2 gloo processes: the same weights and losses as one process; sharded checkpoints
resume at another world size; the gathered HF export is a plain model folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# 3 Adam steps at lr 1e-3 on tiny-llama: FSDP sums the gradient shards in another order than one
# process does (float32), and Adam divides by the gradient's own size, so a near-cancelling entry
# can move by ~1e-6 per step. 1e-5 is 1% of one step's move; a lost shard or a double-counted
# gradient moves weights by ~1e-3.
ATOL = 1e-5
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _args(data: Path, run_dir: Path, steps: int, *extra: str) -> list[str]:
    return ["model.name=tiny-llama", f"data.path={data}", "data.limit=24", "train.micro_batch_tokens=256",
            "train.micro_batches_per_step=2", f"train.max_steps={steps}", "train.lr=1e-3", "train.loss_chunk_size=64",
            "train.fsdp.enabled=true", "progress=false", f"run_dir={run_dir}", *extra]


def _run(nproc: int, args: list[str], *flags: str) -> None:
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
              if nproc > 1 else [sys.executable])
    subprocess.run([*launch, "-m", "posttrain.sft", *args, *flags], check=True, env=ENV, timeout=600)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def _losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_fsdp_two_processes_equal_one(tmp_path, arith_jsonl) -> None:
    """3 steps, 2 ranks sharded vs 1 process; the export is an HF folder transformers loads."""
    one, two = tmp_path / "one", tmp_path / "two"
    _run(1, _args(arith_jsonl, one, 3, "train.fsdp.enabled=false"))
    _run(2, _args(arith_jsonl, two, 3))
    assert (two / "checkpoints" / "step-00000003" / "dcp" / ".metadata").is_file()
    assert _max_diff(_weights(one / "model"), _weights(two / "model")) < ATOL
    assert _losses(one) == pytest.approx(_losses(two), rel=1e-5)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(two / "model")


@pytest.mark.slow
@pytest.mark.parametrize("resume_world", [1, 2])
def test_sharded_checkpoint_resumes_at_another_world_size(tmp_path, arith_jsonl, resume_world) -> None:
    """Saved by 2 ranks after step 2, resumed by ``resume_world`` processes: step 3 as if never stopped."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    _run(1, _args(arith_jsonl, whole, 3))  # fsdp.enabled with one process: unsharded model, sharded checkpoints
    _run(2, _args(arith_jsonl, split, 3), "--stop-after", "2")
    _run(resume_world, _args(arith_jsonl, split, 3), "--resume")
    assert _max_diff(_weights(whole / "model"), _weights(split / "model")) < ATOL
    assert _losses(whole)[-1] == pytest.approx(_losses(split)[-1], rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("model,extra", [
    ("tiny-nemotron-h", ("lora.enabled=true", "lora.r=4", "train.freeze_router=true")),
    ("tiny-nemotron-h", ("train.freeze_router=true",)),  # full fine-tuning of the MoE, router frozen
    ("tiny-llama", ("train.freeze_layers=1",)),
])
def test_fsdp_lora_and_frozen_layers_equal_one_process(tmp_path, arith_jsonl, model, extra) -> None:
    """LoRA on NemotronH with its MoE router frozen, the MoE fully fine-tuned with its router frozen, and
    frozen lower layers: 2 sharded ranks = 1 plain process; the export merges the gathered LoRA pieces
    layer by layer as merge_and_unload does, and writes NemotronH's own checkpoint names."""
    one, two = tmp_path / "one", tmp_path / "two"
    args = [a for a in _args(arith_jsonl, one, 3, *extra) if not a.startswith("model.name=")]
    _run(1, [f"model.name={model}", *args, "train.fsdp.enabled=false"])
    args = [a for a in _args(arith_jsonl, two, 3, *extra) if not a.startswith("model.name=")]
    _run(2, [f"model.name={model}", *args])
    assert _max_diff(_weights(one / "model"), _weights(two / "model")) < ATOL
    assert _losses(one) == pytest.approx(_losses(two), rel=1e-5)
