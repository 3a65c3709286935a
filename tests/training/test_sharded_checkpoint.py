"""Sharded-checkpoint format and the gathered HF export in one process (no group): the round trip
is exact and the export, cut into parts, is a folder transformers loads."""

from __future__ import annotations

import pytest
import torch

from posttrain.training.checkpoint import latest_checkpoint
from posttrain.training.parallel import Parallel
from posttrain.training.sharded_checkpoint import export_gathered, load_any_checkpoint, save_sharded_checkpoint


def _model_and_optimizer(folder):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(folder)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _step(model, optimizer) -> None:
    ids = torch.arange(1, 17)[None]
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()


def test_round_trip_and_export_in_parts(tmp_path, tiny_llama_dir) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, optimizer = _model_and_optimizer(tiny_llama_dir)
    _step(model, optimizer)
    save_sharded_checkpoint(tmp_path, 1, model, optimizer, None, None, {"seen": 5}, 2, Parallel())
    _step(model, optimizer)
    want = {k: v.clone() for k, v in model.state_dict().items()}

    again, opt2 = _model_and_optimizer(tiny_llama_dir)
    state = load_any_checkpoint(latest_checkpoint(tmp_path), again, opt2)
    assert state == {"step": 1, "sharded": True, "seen": 5}
    _step(again, opt2)
    for key, value in again.state_dict().items():
        assert torch.equal(value, want[key]), key

    out = export_gathered(again, AutoTokenizer.from_pretrained(tiny_llama_dir), tmp_path / "model", Parallel(),
                          max_shard_bytes=200_000)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for key, value in loaded.items():
        assert torch.equal(value, want[key]), key


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-nemotron-h"])
def test_export_keeps_every_real_weight(tmp_path, name, tiny_llama_dir, tiny_nemotron_dir) -> None:
    """NemotronH's config says tie_word_embeddings but its head is its own tensor (transformers 5.19):
    the export writes it, and only a truly tied head (Llama's) is left to the embedding. Reloaded,
    the logits equal the source model's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = {"tiny-llama": tiny_llama_dir, "tiny-nemotron-h": tiny_nemotron_dir}[name]
    model = AutoModelForCausalLM.from_pretrained(folder)
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert (head is embed) == (name == "tiny-llama")
    with torch.no_grad():
        head.add_(0.05)  # a trained head: differs from the start model's (and, untied, from the embedding)
    out = export_gathered(model, AutoTokenizer.from_pretrained(folder), tmp_path / "model", Parallel())
    again = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.arange(1, 41)[None]
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
