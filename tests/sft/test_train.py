"""End-to-end SFT on tiny models: run folder contents, exact resume, LoRA + router freezing, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from posttrain.config import load_config
from posttrain.sft.config import SFTConfig
from posttrain.sft.train import train


def _cfg(run_dir: Path, data: Path, model: str = "tiny-llama", *extra: str) -> SFTConfig:
    return load_config(SFTConfig, None, [
        f"model.name={model}", f"data.path={data}", "data.limit=24", f"run_dir={run_dir}",
        "train.micro_batch_tokens=256", "train.micro_batches_per_step=2", "train.max_steps=4",
        "train.lr=1e-3", "train.save_every=2", "train.loss_chunk_size=64", "progress=false", *extra])


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)


def test_full_run_folder_and_exact_resume(tmp_path, arith_jsonl) -> None:
    whole = train(_cfg(tmp_path / "whole", arith_jsonl))
    assert (whole / "config.yaml").is_file()
    assert list((whole / "tensorboard").glob("events.out.tfevents.*"))
    assert (whole / "checkpoints" / "step-00000004" / "trainer.pt").is_file()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(whole / "model")  # a plain HF folder

    split = tmp_path / "split"
    train(_cfg(split, arith_jsonl), stop_after=2)  # "killed" after step 2's checkpoint
    assert not (split / "model").exists()
    train(_cfg(split, arith_jsonl), resume=True)
    _assert_same(_weights(whole / "model"), _weights(split / "model"))


def test_lora_nemotron_h_with_frozen_router_resumes(tmp_path, arith_jsonl) -> None:
    extra = ("lora.enabled=true", "lora.r=4", "train.freeze_router=true")
    whole = train(_cfg(tmp_path / "whole", arith_jsonl, "tiny-nemotron-h", *extra))
    adapter = whole / "checkpoints" / "step-00000004" / "model"
    assert (adapter / "adapter_config.json").is_file()
    import json

    targets = set(json.loads((adapter / "adapter_config.json").read_text())["target_modules"])
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "in_proj", "up_proj", "down_proj"}
    split = tmp_path / "split"
    train(_cfg(split, arith_jsonl, "tiny-nemotron-h", *extra), stop_after=2)
    train(_cfg(split, arith_jsonl, "tiny-nemotron-h", *extra), resume=True)
    _assert_same(_weights(adapter), _weights(split / "checkpoints" / "step-00000004" / "model"))


def test_router_frozen(tiny_nemotron_dir) -> None:
    from transformers import AutoModelForCausalLM

    from posttrain.sft.config import TrainConfig
    from posttrain.training.config import LoraConfig
    from posttrain.training.model import prepare_for_training

    model = AutoModelForCausalLM.from_pretrained(tiny_nemotron_dir)
    model = prepare_for_training(model, TrainConfig(freeze_router=True, gradient_checkpointing=False), LoraConfig())
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(".gate." in n for n in frozen)


def test_lower_layers_frozen_stay_put_and_the_rest_trains(tmp_path, arith_jsonl, tiny_llama_dir) -> None:
    from transformers import AutoModelForCausalLM

    from posttrain.sft.config import TrainConfig
    from posttrain.training.config import LoraConfig
    from posttrain.training.model import prepare_for_training

    with pytest.raises(ValueError, match="between 1 and 1"):
        prepare_for_training(AutoModelForCausalLM.from_pretrained(tiny_llama_dir),
                             TrainConfig(freeze_layers=2, gradient_checkpointing=False), LoraConfig())
    train(_cfg(tmp_path, arith_jsonl, "tiny-llama", "train.freeze_layers=1"))
    before, after = _weights(tiny_llama_dir), _weights(tmp_path / "model")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("model.layers.1.", "model.norm.")) for k in changed), changed
    assert any(k.startswith("model.layers.1.") for k in changed)


def test_cli_dry_run_and_errors(tmp_path, arith_jsonl) -> None:
    from posttrain.cli import main

    assert main(["sft", "--config", "configs/sft/smollm2_reasoning.yaml", "train.lr=3e-4", "--dry-run"]) == 0
    assert main(["sft", "trian.lr=1"]) == 2  # unknown key: error, not ignored
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    assert main(["sft", f"data.path={bad}", f"run_dir={tmp_path / 'r'}"]) == 2
    assert not (tmp_path / "r").exists()  # failed before anything was written
    out = subprocess.run([sys.executable, "-m", "posttrain.sft", "preview", f"data.path={arith_jsonl}",
                          "model.name=tiny-llama", "-n", "1", "--plain"], capture_output=True, text=True, check=True)
    assert "[[<think>" in out.stdout and "]]" in out.stdout


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path, arith_jsonl) -> None:
    """gloo data parallel: same global batch, same loss and weights as one process."""
    args = ["model.name=tiny-llama", f"data.path={arith_jsonl}", "data.limit=24", "train.micro_batch_tokens=256",
            "train.micro_batches_per_step=2", "train.max_steps=3", "train.lr=1e-3", "progress=false"]
    one = tmp_path / "one"
    two = tmp_path / "two"
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}
    import os

    env = {**os.environ, **env}
    subprocess.run([sys.executable, "-m", "posttrain.sft", *args, f"run_dir={one}"], check=True, env=env)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "posttrain.sft",
                    *args, f"run_dir={two}"], check=True, env=env)
    _assert_same(_weights(one / "model"), _weights(two / "model"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    losses = []
    for run in (one, two):
        acc = EventAccumulator(str(run / "tensorboard"))
        acc.Reload()
        losses.append([e.value for e in acc.Scalars("train/loss")])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)


def _linear_output_dtypes(model) -> tuple[set, object]:
    """The dtypes the model's decoder Linear layers output (filled as they run), and the hooks' handles."""
    seen: set = set()
    hooks = [m.register_forward_hook(lambda _m, _i, out: seen.add(out.dtype))
             for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in name]
    return seen, hooks


def test_mixed_precision_runs_in_bf16_and_keeps_fp32_weights(tmp_path, arith_jsonl) -> None:
    """``train.mixed_precision: bf16``: the decoder's matmuls run in bf16 (autocast), the weights and
    their AdamW state stay fp32, and the step's loss is the fp32 step's to bf16 precision."""
    from posttrain import models
    from posttrain.sft import data as sft_data
    from posttrain.sft.packing import plan_steps, resolve_packing
    from posttrain.sft.train import build_optimizer, train_step
    from posttrain.training import parallel

    results = {}
    for precision in ("none", "bf16"):
        cfg = _cfg(tmp_path / precision, arith_jsonl, "tiny-llama", f"train.mixed_precision={precision}")
        torch.manual_seed(0)
        tokenizer = models.tokenizer_for(cfg.model)
        model = models.model_for(cfg.model)
        samples = sft_data.build(cfg.data, tokenizer, cfg.train.micro_batch_tokens).samples
        mode = resolve_packing(cfg.train.packing, model)
        step = plan_steps([len(s.input_ids) for s in samples], max_tokens=cfg.train.micro_batch_tokens,
                          micro_batches_per_step=cfg.train.micro_batches_per_step, epochs=1, seed=0, mode=mode)[0]
        optimizer, scheduler = build_optimizer(model, cfg, 4)
        seen, hooks = _linear_output_dtypes(model)
        result = train_step(model, optimizer, scheduler, step, samples, mode, tokenizer.pad_token_id, cfg,
                            parallel.Parallel(), "cpu")
        for h in hooks:
            h.remove()
        assert all(p.dtype == torch.float32 for p in model.parameters())
        assert all(v.dtype == torch.float32 for s in optimizer.state.values() for v in s.values() if v.dim())
        results[precision] = (result.loss, seen)
    assert results["none"][1] == {torch.float32} and results["bf16"][1] == {torch.bfloat16}
    assert results["bf16"][0] == pytest.approx(results["none"][0], rel=2e-2)
