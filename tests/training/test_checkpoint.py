"""Checkpoints: atomic layout, pruning, exact round trip of weights/optimizer/RNG."""

from __future__ import annotations

import torch

from posttrain.training.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint


def _model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_round_trip_and_pruning(tmp_path, tiny_llama_dir) -> None:
    model = _model(tiny_llama_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(input_ids=torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    opt.step()
    (tmp_path / "checkpoints" / ".step-00000009.tmp-dead").mkdir(parents=True)  # a killed writer's leftover
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, state={"note": "x"}, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt is not None and ckpt.step == 3 and ckpt.state["note"] == "x"

    fresh = _model(tiny_llama_dir)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    load_checkpoint(ckpt, fresh, fresh_opt)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name
    assert fresh_opt.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    # the model folder is a plain HF folder
    assert (ckpt.path / "model" / "config.json").is_file()
    _model(ckpt.path / "model")


def test_no_checkpoint(tmp_path) -> None:
    assert latest_checkpoint(tmp_path) is None
