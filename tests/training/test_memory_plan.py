"""The memory plan (training/memory_plan.py): parameter, gradient and AdamW bytes equal the tensors
of a real step on the tiny models; sharding and context parallelism divide what they should; the
Nano preset plans 31.6B parameters and prints in ``posttrain sft --dry-run``."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
import torch

from posttrain.training import memory_plan as mp

ROOT = Path(__file__).resolve().parents[2]


def _rows(plan: mp.MemoryPlan, word: str) -> int:
    return sum(v for k, v in plan.rows.items() if k.startswith(word))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-nemotron-h"])
def test_params_grads_adamw_bytes_equal_the_tensors(name, tiny_llama_dir, tiny_nemotron_dir) -> None:
    from transformers import AutoModelForCausalLM

    folder = {"tiny-llama": tiny_llama_dir, "tiny-nemotron-h": tiny_nemotron_dir}[name]
    cfg = mp.load_hf_config(str(folder))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    shape = mp.model_shape(cfg)
    for layer, module in zip(shape.layers, model.model.layers, strict=True):
        assert layer.params == sum(p.numel() for p in module.parameters()), layer.kind
    params = list(model.parameters())  # tied weights once
    assert shape.params == sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.arange(1, 33)[None]
    model(ids, labels=ids).loss.backward()
    opt.step()
    plan = mp.plan(cfg, mp.StepShape(tokens=32, dtype="float32"))
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    assert _rows(plan, "parameters") == nbytes(params)
    assert _rows(plan, "gradients") == nbytes(p.grad for p in params)
    assert _rows(plan, "optimizer") == nbytes(v for s in opt.state.values() for v in s.values() if v.dim())


def test_lora_and_frozen_router_count_only_what_trains(tiny_nemotron_dir) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from posttrain.training.model import NEMOTRON_H_LORA_TARGETS

    cfg = mp.load_hf_config(str(tiny_nemotron_dir))
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_nemotron_dir),
                           LoraConfig(r=4, target_modules=list(NEMOTRON_H_LORA_TARGETS)))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    plan = mp.plan(cfg, mp.StepShape(tokens=32, lora_r=4, lora_targets=tuple(NEMOTRON_H_LORA_TARGETS)))
    assert _rows(plan, "gradients") == trainable * 4
    full, frozen = (mp.plan(cfg, mp.StepShape(tokens=32, freeze_router=r)) for r in (False, True))
    routers = sum(layer.router for layer in mp.model_shape(cfg).layers)
    assert routers == 2 * 8 * 64 and _rows(full, "gradients") - _rows(frozen, "gradients") == routers * 4


def test_sharding_and_context_parallelism_divide_the_right_rows() -> None:
    cfg = json.loads((ROOT / "configs/models/nano3.json").read_text())
    assert round(mp.model_shape(cfg).params / 1e9, 1) == 31.6  # DESIGN.md section 3
    one = mp.plan(cfg, mp.StepShape(tokens=262144, dtype="bfloat16", world=1))
    cp8 = mp.plan(cfg, mp.StepShape(tokens=262144, dtype="bfloat16", world=32, cp=8, fsdp=True))
    for word in ("parameters", "gradients", "optimizer"):
        assert _rows(cp8, word) == _rows(one, word) // 32
    assert _rows(cp8, "activations: saved") * 8 == _rows(one, "activations: saved")
    master = mp.plan(cfg, mp.StepShape(tokens=262144, dtype="bfloat16", world=32, cp=8, fsdp=True, fp32_master=True))
    assert _rows(master, "optimizer") == 3 * _rows(cp8, "optimizer")  # 12 vs 4 bytes per bf16 weight
    assert not one.fits(mp.parse_bytes("80GB")) and cp8.fits(mp.parse_bytes("80GB"))
    with pytest.raises(ValueError, match="cp=3"):
        mp.plan(cfg, mp.StepShape(tokens=1024, world=32, cp=3))


def test_parse_bytes() -> None:
    assert mp.parse_bytes("80GiB") == 80 * 2**30 and mp.parse_bytes("80GB") == 80 * 10**9
    assert mp.parse_bytes("512 MiB") == 512 * 2**20 and mp.parse_bytes("1000") == 1000
    with pytest.raises(ValueError, match="80GiB"):
        mp.parse_bytes("lots")


def test_imports_without_torch() -> None:
    tree = ast.parse((ROOT / "posttrain/training/memory_plan.py").read_text())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert "torch" not in names and "transformers" not in names


def test_dry_run_prints_the_nano_256k_plan(capsys, monkeypatch) -> None:
    from posttrain.cli import main

    monkeypatch.chdir(ROOT)
    assert main(["sft", "--config", "configs/sft/nano3_256k.yaml", "--dry-run", "--world", "32",
                 "--device-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "parameters (31.6B)" in out and "32768 tokens per rank" in out and "fits in 74.5 GiB" in out


def test_autocast_rows_equal_the_weight_copies_saved_for_backward(tiny_llama_dir) -> None:
    """train.mixed_precision: bf16 over fp32 weights: the plan's copies row is the bf16 weights autograd
    keeps for backward (each linear's, cast once), measured with saved-tensor hooks on a real forward."""
    from transformers import AutoModelForCausalLM

    cfg = mp.load_hf_config(str(tiny_llama_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    weights = [p.detach().to(torch.bfloat16) for p in model.model.layers.parameters() if p.dim() == 2]
    copies: dict[int, int] = {}  # storage -> bytes of the bf16 weight casts saved for backward

    def keep(t: torch.Tensor) -> torch.Tensor:
        if t.dtype == torch.bfloat16 and t.dim() == 2 and any(
                any(w.shape == u.shape and torch.equal(w, u) for u in (t, t.T)) for w in weights):  # linear saves W.T
            copies[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.arange(1, 33)[None]
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model.model(ids).last_hidden_state.float().sum().backward()
    plan = mp.plan(cfg, mp.StepShape(tokens=32, dtype="float32", autocast="bfloat16"))
    assert _rows(plan, "autocast: bfloat16 copies") == sum(copies.values()) > 0
    fp32 = mp.plan(cfg, mp.StepShape(tokens=32, dtype="float32"))
    assert _rows(plan, "activations") * 2 == _rows(fp32, "activations")  # activations in bf16: half
