"""Context parallelism through NemotronH's Mamba2 layers: CP=2 equals CP=1 (#17 item 4b).

Each rank scans its chunks from a zero state; the chunks' final states and decays are
all-gathered and every rank starts its chunks from the state the row before them leaves
(``mamba_packing.cp_mixer_forward``). Attention uses ``training.context_parallel``'s all-gather
K/V; ``cp.cp_nll_sum`` runs the whole CP pass.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from posttrain.sft.packing import collate_packed, collate_padded
from posttrain.training import context_parallel as cp
from posttrain.training import mamba_packing as mp
from posttrain.training.loss import causal_lm_nll_sum

from test_mamba_packing import _make_stateful  # the same stateful set-up as the packing tests

TOL = 1e-5


def _batch(case: dict) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(case.get("seed", 0))
    docs = []
    for n in case["lengths"]:
        ids = torch.randint(3, 4000, (n,), generator=g).tolist()
        docs.append((ids, [0] * (n // 5) + [1] * (n - n // 5)))
    return collate_packed(docs) if case["mode"] == "pack" else collate_padded(docs, pad_id=0)


def _reference(model_dir: str, batch: dict[str, torch.Tensor], stateful: bool = False
               ) -> tuple[float, dict[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if stateful:
        _make_stateful(model)
    mp.enable_exact_packing(model)  # CP=1 with exact packing
    model.train()
    nll, count = causal_lm_nll_sum(model, batch, 256)
    (nll / count).backward()
    return float(nll.detach()) / count, {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


def test_cp_size_one_equals_packed(tiny_nemotron_dir) -> None:
    from transformers import AutoModelForCausalLM

    batch = _batch({"mode": "pack", "lengths": [50, 130, 200]})
    ref_loss, ref = _reference(str(tiny_nemotron_dir), batch)
    model = AutoModelForCausalLM.from_pretrained(tiny_nemotron_dir, dtype=torch.float32).train()
    nll, count = cp.cp_nll_sum(model, batch, None, 256)
    (nll / count).backward()
    assert abs(float(nll) / count - ref_loss) <= TOL
    for k, p in model.named_parameters():
        if k in ref:
            torch.testing.assert_close(p.grad, ref[k], rtol=0, atol=TOL, msg=k)


def _worker(rank: int, world: int, init_file: str, model_dir: str, cases: list[dict], out: str) -> None:
    torch.set_num_threads(1)
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    group = dist.new_group(list(range(world)))
    results = []
    for case in cases:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        _make_stateful(model)
        if case.get("checkpointing"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()
        batch = _batch(case)
        nll, count = cp.cp_nll_sum(model, batch, group, 256)
        (nll / count).backward()
        loss = nll.detach().reshape(1)
        dist.all_reduce(loss, group=group)
        grads = {k: p.grad if p.grad is not None else torch.zeros_like(p) for k, p in model.named_parameters()}
        for g in grads.values():
            dist.all_reduce(g, group=group)
        if rank == 0:
            ref_loss, ref = _reference(model_dir, batch, stateful=True)
            results.append({
                "name": case["name"], "loss": float(loss) / count, "ref_loss": ref_loss,
                "max_grad_diff": max(float((grads[k] - g).abs().max()) for k, g in ref.items()),
                "mamba_grads": sorted(k for k in ref if "A_log" in k or "conv1d" in k),
            })
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def _run_two_ranks(tmp_path: Path, model_dir: Path, cases: list[dict]) -> None:
    import torch.multiprocessing as tmp

    out = tmp_path / "results.json"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    tmp.spawn(_worker, args=(2, str(tmp_path / "init"), str(model_dir), cases, str(out)), nprocs=2, join=True)
    for r in json.loads(out.read_text()):
        print(f"{r['name']}: |loss diff| {abs(r['loss'] - r['ref_loss']):.2e}, max grad diff {r['max_grad_diff']:.2e}")
        assert abs(r["loss"] - r["ref_loss"]) <= TOL, r
        assert r["max_grad_diff"] <= TOL, r
        assert len(r["mamba_grads"]) == 6, r  # A_log, conv1d weight and bias of both Mamba layers


def test_cp2_equals_cp1_through_mamba_layers(tmp_path, tiny_nemotron_dir) -> None:
    # 1024 tokens, chunks of 256 (two SSD chunks each): rank 0 holds [0, 256) + [768, 1024), rank 1
    # [256, 768). A document starts 2 tokens before the seam at 256 (the conv window spans two
    # documents), one exactly at the seam at 512, a one-token document; the others cross seams.
    cases = [{"name": "packed-seams", "mode": "pack", "lengths": [254, 258, 1, 300, 211], "seed": 1}]
    _run_two_ranks(tmp_path, tiny_nemotron_dir, cases)


@pytest.mark.slow
def test_cp2_equals_cp1_through_mamba_layers_more(tmp_path, tiny_nemotron_dir) -> None:
    cases = [
        {"name": "packed-crossing", "mode": "pack", "lengths": [300, 411, 310]},  # 1021 -> 1024 with a pad tail
        {"name": "padded-rows", "mode": "pad", "lengths": [150, 97, 201], "seed": 2},
        {"name": "checkpointing", "mode": "pack", "lengths": [130, 190], "seed": 3, "checkpointing": True},
    ]
    _run_two_ranks(tmp_path, tiny_nemotron_dir, cases)


def test_short_chunks_are_refused(tiny_nemotron_dir) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_nemotron_dir, dtype=torch.float32)
    mixer = next(m for m in model.modules() if mp.supports(m))
    shard = cp.shard_batch(_batch({"mode": "pack", "lengths": [8]}), 4, 0)[1]  # chunks of 1 token
    with pytest.raises(ValueError, match="shorter than the Mamba conv window"):
        mp.cp_mixer_forward(mixer, torch.zeros(1, 2, model.config.hidden_size), index=shard.index,
                            gather_index=shard.gather_index, doc=shard.doc, group=None)
