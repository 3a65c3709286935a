"""`posttrain export --fp8`: compressed-tensors FP8 (per-channel weights, per-token dynamic activations),
selective as the recipe was, readable back by transformers, and a plain bf16 copy for CPU checks."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open

from posttrain.export import export_fp8, kept_in_bf16


def test_llama_export_keeps_attention_and_head_and_reads_back(tmp_path, tiny_llama_dir) -> None:
    from transformers import AutoModelForCausalLM

    out, plain = tmp_path / "fp8", tmp_path / "bf16"
    summary = export_fp8(str(tiny_llama_dir), str(out), dequantized=str(plain))
    assert summary["quantized_layers"] == 6 and summary["kept_bf16_layers"] == 9  # 2 layers x 3 MLP; head + 2 x 4
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["format"]) == ("compressed-tensors", "float-quantized")
    group = qc["config_groups"]["group_0"]
    assert (group["weights"]["strategy"], group["input_activations"]["dynamic"]) == ("channel", True)
    assert "lm_head" in qc["ignore"] and "model.layers.1.self_attn.q_proj" in qc["ignore"]
    original = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    back = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.bfloat16)
    assert getattr(back.config, "quantization_config", None) is None  # a plain folder: weights only
    with safe_open(str(plain / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if not k.endswith("weight")]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        q = f.get_tensor("model.layers.0.mlp.up_proj.weight")
        scale = f.get_tensor("model.layers.0.mlp.up_proj.weight_scale")
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (q.shape[0], 1)
    ours = q.float() * scale.float()
    torch.testing.assert_close(back.model.layers[0].mlp.up_proj.weight.float(), ours, rtol=1e-2, atol=1e-3)
    w = original.model.layers[0].mlp.up_proj.weight.float()
    assert ((ours - w).abs() <= w.abs().amax(1, keepdim=True) / 16).all()  # e4m3: 3 mantissa bits per channel
    assert torch.equal(back.model.layers[0].self_attn.q_proj.weight, original.model.layers[0].self_attn.q_proj.weight)
    ids = torch.randint(3, 4000, (1, 32))
    drift = (back(ids).logits.float().log_softmax(-1) - original(ids).logits.float().log_softmax(-1)).abs().max()
    assert drift < 0.5


def test_nemotron_h_keeps_attention_and_the_mamba_layer_feeding_it(tmp_path, tiny_nemotron_dir) -> None:
    from posttrain import models

    model = models.load_model(str(tiny_nemotron_dir), dtype="bfloat16", device="cpu")
    kept = kept_in_bf16(model)  # pattern M*EME*: layer 0 feeds attention 1; layer 4 (MoE) precedes attention 5
    assert [k for k in kept if k.startswith("model.layers.0.")] == ["model.layers.0.mixer.in_proj",
                                                                     "model.layers.0.mixer.out_proj"]
    assert not any(k.startswith("model.layers.3.") for k in kept) and "model.layers.5.mixer.q_proj" in kept
    assert kept_in_bf16(model, selective=False) == ["lm_head"]
    summary = export_fp8(str(tiny_nemotron_dir), str(tmp_path / "fp8"))
    assert summary["experts_left_bf16_gib"] > 0  # fused 3-D experts: said, not silently skipped


def test_export_needs_a_format(tmp_path, capsys) -> None:
    from posttrain.cli import main

    assert main(["export", "tiny-llama", "--out", str(tmp_path / "x")]) == 2  # a user error: one line, exit 2
    assert "say which format (--fp8" in capsys.readouterr().err and not (tmp_path / "x").exists()
