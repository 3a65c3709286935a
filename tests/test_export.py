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


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_nemotron_h_keeps_attention_and_the_mamba_layer_feeding_it(tiny_nemotron_dir) -> None:
    from posttrain import models

    model = models.load_model(str(tiny_nemotron_dir), dtype="bfloat16", device="cpu")
    kept = kept_in_bf16(model)  # pattern M*EME*: layer 0 feeds attention 1; layer 4 (MoE) precedes attention 5
    assert [k for k in kept if k.startswith("model.layers.0.")] == ["model.layers.0.mixer.in_proj",
                                                                     "model.layers.0.mixer.out_proj"]
    assert not any(k.startswith("model.layers.3.") for k in kept) and "model.layers.5.mixer.q_proj" in kept
    assert kept_in_bf16(model, selective=False) == ["lm_head"]


def test_nemotron_h_fused_experts_go_fp8_under_the_checkpoints_per_expert_names(tmp_path, tiny_nemotron_dir) -> None:
    from transformers import AutoModelForCausalLM

    out, plain = tmp_path / "fp8", tmp_path / "bf16"
    summary = export_fp8(str(tiny_nemotron_dir), str(out), dequantized=str(plain))
    assert summary["quantized_expert_tensors"] == 4  # 2 MoE layers x (up, down), each [8 experts, out, in]
    original = {k: v.to(torch.bfloat16) for k, v in _tensors(tiny_nemotron_dir).items()}
    fp8 = _tensors(out)
    scales = {k for k in fp8 if k.endswith(".weight_scale")}
    assert set(fp8) - scales == set(original)  # every tensor under the name the bf16 checkpoint gives it
    experts = sorted(k for k in original if ".mixer.experts." in k)
    assert len(experts) == 2 * 2 * 8 and experts[0] == "backbone.layers.2.mixer.experts.0.down_proj.weight"
    for key in experts:  # vLLM's MoE loader reads E.up_proj.weight + E.up_proj.weight_scale per expert
        q, scale, w = fp8[key], fp8[key.removesuffix("weight") + "weight_scale"].float(), original[key].float()
        assert q.dtype == torch.float8_e4m3fn and scale.shape == (w.shape[0], 1)
        ours = q.float() * scale
        assert ((ours - w).abs() <= w.abs().amax(1, keepdim=True) / 16).all() and not torch.equal(ours, w)
    assert fp8["backbone.layers.1.mixer.q_proj.weight"].dtype == torch.bfloat16  # attention kept
    assert fp8["backbone.layers.0.mixer.conv1d.weight"].dtype == torch.bfloat16  # not a Linear
    assert fp8["backbone.layers.3.mixer.in_proj.weight"].dtype == torch.float8_e4m3fn  # feeds MoE, not attention
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["config_groups"]["group_0"]["targets"] == ["Linear"]  # vLLM applies the Linear scheme to experts
    assert not [name for name in qc["ignore"] if "experts" in name]  # so no expert may be listed as ignored

    back = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.bfloat16)
    source = AutoModelForCausalLM.from_pretrained(tiny_nemotron_dir, dtype=torch.bfloat16)
    got = back.model.layers[2].mixer.experts.up_proj[5].float()
    q = fp8["backbone.layers.2.mixer.experts.5.up_proj.weight"].float()
    torch.testing.assert_close(got, q * fp8["backbone.layers.2.mixer.experts.5.up_proj.weight_scale"].float(),
                               rtol=1e-2, atol=1e-3)
    ids = torch.randint(3, 4000, (1, 32))
    drift = (back(ids).logits.float().log_softmax(-1) - source(ids).logits.float().log_softmax(-1)).abs()
    assert 0 < drift.max() < 0.5


def test_vllm_reads_the_nemotron_h_fp8_config_as_exported(tmp_path, tiny_nemotron_dir) -> None:
    """vLLM's own compressed-tensors config, on our config.json, under vLLM's layer names: experts and MLPs
    FP8 (channel weights, token activations), fused attention and the Mamba layer feeding it bf16."""
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import CompressedTensorsConfig
    from vllm.model_executor.models.nemotron_h import NemotronHForCausalLM

    export_fp8(str(tiny_nemotron_dir), str(tmp_path / "fp8"))
    exported = json.loads((tmp_path / "fp8/config.json").read_text())["quantization_config"]
    config = CompressedTensorsConfig.from_config(exported)
    config.packed_modules_mapping = NemotronHForCausalLM.packed_modules_mapping  # as vLLM sets it for the model
    config._add_fused_moe_to_target_scheme_map()  # what vLLM does before asking for an MoE layer's scheme

    def scheme(name: str) -> tuple[str, str] | None:
        found = config.get_scheme_dict(torch.nn.Linear(2, 2), name)
        return found and (found["weights"].strategy, found["input_activations"].strategy)

    fp8 = ("channel", "token")
    assert scheme("model.layers.2.mixer.experts.0.up_proj") == scheme("model.layers.4.mixer.experts.0.down_proj") == fp8
    assert scheme("model.layers.2.mixer.shared_experts.up_proj") == scheme("model.layers.3.mixer.in_proj") == fp8
    assert scheme("model.layers.1.mixer.qkv_proj") is scheme("model.layers.5.mixer.o_proj") is None
    assert scheme("model.layers.0.mixer.in_proj") is scheme("lm_head") is None


def test_a_sharded_fp8_folder_dequantises_with_its_index(tmp_path, tiny_llama_dir) -> None:
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from posttrain.export import write_dequantized

    one, sharded = tmp_path / "fp8", tmp_path / "fp8-sharded"
    export_fp8(str(tiny_llama_dir), str(one))
    sharded.mkdir()
    tensors = _tensors(one)
    names = sorted(tensors)
    cut = next(i + 1 for i, k in enumerate(names) if names[i + 1] == k + "_scale")  # a weight | its scale
    halves = {"model-00001-of-00002.safetensors": names[:cut], "model-00002-of-00002.safetensors": names[cut:]}
    for shard, keys in halves.items():
        save_file({k: tensors[k] for k in keys}, sharded / shard, metadata={"format": "pt"})
    (sharded / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": 1}, "weight_map": {k: shard for shard, keys in halves.items() for k in keys}}))
    (sharded / "config.json").write_text((one / "config.json").read_text())
    write_dequantized(str(sharded), str(tmp_path / "plain"))
    index = json.loads((tmp_path / "plain/model.safetensors.index.json").read_text())
    assert not [k for k in index["weight_map"] if k.endswith("_scale")]
    plain = _tensors(tmp_path / "plain")
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in plain.values())
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "plain", dtype=torch.bfloat16)
    write_dequantized(str(one), str(tmp_path / "plain-one"))
    assert plain.keys() == _tensors(tmp_path / "plain-one").keys()
    for key, tensor in _tensors(tmp_path / "plain-one").items():  # the same weights, the scale a shard away too
        assert torch.equal(plain[key], tensor) and plain[key].dtype == torch.bfloat16, key
    assert torch.equal(back.model.layers[0].mlp.down_proj.weight, plain["model.layers.0.mlp.down_proj.weight"])


def test_export_needs_a_format(tmp_path, capsys) -> None:
    from posttrain.cli import main

    assert main(["export", "tiny-llama", "--out", str(tmp_path / "x")]) == 2  # a user error: one line, exit 2
    assert "say which format (--fp8" in capsys.readouterr().err and not (tmp_path / "x").exists()
