"""``train.context_parallel=2`` in the SFT driver: 2 gloo ranks splitting every packed row equal one
process running the whole rows (weights, losses), with FSDP2 over ``dp_shard x cp`` and without."""

from __future__ import annotations

import pytest

from posttrain.errors import ConfigError
from posttrain.sft.config import SFTConfig
from posttrain.training import parallel

from test_fsdp import ATOL, _args, _losses, _max_diff, _run, _weights  # same runs, same Adam bound


def test_context_parallel_must_divide_the_processes(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "3")  # checked before any process group is joined
    with pytest.raises(ConfigError, match=r"train.context_parallel=2 must divide the number of processes \(3\)"):
        parallel.init_from_env(2)
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ConfigError, match=r"train.context_parallel=2 must divide the number of processes \(1\)"):
        parallel.init_from_env(2)
    assert SFTConfig().train.context_parallel == 1


def _cp_args(data, run_dir, *extra: str) -> list[str]:
    # packed rows of 256 tokens -> 4 chunks of 64: the arith documents cross the rank seams
    return _args(data, run_dir, 3, "train.packing=pack", *extra)


def test_sft_context_parallel_with_fsdp_equals_one_process(tmp_path, arith_jsonl) -> None:
    """3 steps: 2 ranks (dp_shard 1 x cp 2, FSDP2 over both) = 1 process on whole rows."""
    one, two = tmp_path / "one", tmp_path / "two"
    _run(1, _cp_args(arith_jsonl, one, "train.fsdp.enabled=false"))
    _run(2, _cp_args(arith_jsonl, two, "train.context_parallel=2"))
    diff = _max_diff(_weights(one / "model"), _weights(two / "model"))
    print(f"cp=2 + fsdp vs 1 process: max weight diff {diff:.2e}, losses {_losses(one)} vs {_losses(two)}")
    assert diff < ATOL
    assert _losses(one) == pytest.approx(_losses(two), rel=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("nproc,model,extra", [
    (2, "tiny-llama", ("train.fsdp.enabled=false",)),  # replicated: gradients all-reduced over the cp ranks
    (4, "tiny-llama", ()),  # dp_shard 2 x cp 2: each cp pair takes one of the step's 2 micro-batches
    (2, "tiny-nemotron-h", ("train.freeze_router=true",)),  # Mamba2 state handed from rank to rank
])
def test_sft_context_parallel_meshes_equal_one_process(tmp_path, arith_jsonl, nproc, model, extra) -> None:
    """Other meshes and NemotronH: ``nproc`` ranks with ``context_parallel=2`` = 1 plain process."""
    one, two = tmp_path / "one", tmp_path / "two"
    plain = [a for a in _cp_args(arith_jsonl, one, *extra) if not a.startswith("model.name=")]
    _run(1, [f"model.name={model}", *plain, "train.fsdp.enabled=false"])
    split = [a for a in _cp_args(arith_jsonl, two, *extra) if not a.startswith("model.name=")]
    _run(nproc, [f"model.name={model}", *split, "train.context_parallel=2"])
    diff = _max_diff(_weights(one / "model"), _weights(two / "model"))
    print(f"{model} on {nproc} ranks, cp=2 {extra}: max weight diff {diff:.2e}, "
          f"losses {_losses(one)} vs {_losses(two)}")
    assert diff < ATOL
    assert _losses(one) == pytest.approx(_losses(two), rel=1e-5)


@pytest.mark.slow
def test_context_parallel_checkpoint_resumes_in_one_process(tmp_path, arith_jsonl) -> None:
    """Sharded over the flattened dp_shard x cp mesh, saved after step 2, resumed by one plain process."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    _run(1, _cp_args(arith_jsonl, whole))  # fsdp.enabled in one process: unsharded model, sharded checkpoints
    _run(2, _cp_args(arith_jsonl, split, "train.context_parallel=2"), "--stop-after", "2")
    _run(1, _cp_args(arith_jsonl, split), "--resume")
    diff = _max_diff(_weights(whole / "model"), _weights(split / "model"))
    print(f"cp=2 checkpoint resumed in 1 process: max weight diff {diff:.2e}")
    assert diff < ATOL
    assert _losses(whole)[-1] == pytest.approx(_losses(split)[-1], rel=1e-5)
