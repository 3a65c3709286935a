"""`posttrain dpo` on tiny-llama: TRL's DPO loss checked by hand, our run folder, atomic checkpoints, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from posttrain.config import load_config
from posttrain.errors import ConfigError, DataError
from posttrain.preference.config import DPOStageConfig
from posttrain.preference.pairs import preference_rows

CONFIGS = Path(__file__).parents[2] / "configs"


def tiny(run_dir: Path, *overrides: str) -> DPOStageConfig:
    return load_config(DPOStageConfig, CONFIGS / "dpo" / "tiny_smoke.yaml", [f"run_dir={run_dir}", *overrides])


def test_helpsteer_pairs_put_the_preferred_response_first():
    from posttrain.genrm.preference_data import load_pairs, preferred_side

    rows = preference_rows(limit=6)
    pairs = load_pairs(limit=6)
    for row, pair in zip(rows, pairs):
        better = pair.response_1 if preferred_side(pair.ranking) == 1 else pair.response_2
        assert row["chosen"] == [{"role": "assistant", "content": better}] and row["prompt"] == pair.context
        assert 1.0 <= row["margin"] <= 3.0 and row["chat_template_kwargs"] == {"enable_thinking": False}


def test_prompt_chosen_rejected_rows_in_both_forms(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "Say hi", "chosen": "hi", "rejected": "no"},
            {"prompt": [{"role": "user", "content": "Say yo"}], "chosen": [{"role": "assistant", "content": "yo"}],
             "rejected": [{"role": "assistant", "content": "no"}], "margin": 2},
            {"prompt": "bad", "chosen": "", "rejected": "x"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = preference_rows(str(path), system="Be brief.")
    assert len(out) == 2  # the empty chosen response is reported and dropped
    assert out[0]["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi"}]
    assert out[1]["chosen"] == [{"role": "assistant", "content": "yo"}] and out[1]["margin"] == 2.0
    with pytest.raises(DataError, match="field 'chosen' must be a non-empty string"):
        from posttrain.preference.pairs import _plain_row

        _plain_row(rows[2])


def _sum_logprob(model, prompt, completion):
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float()
    return float(torch.log_softmax(logits, -1).gather(1, ids[0, len(prompt):, None]).sum())


def test_a_reference_free_dpo_step_loss_equals_the_hand_computed_one(tmp_path, tiny_llama_dir):
    """-log sigmoid(beta * (log p(chosen) - log p(rejected))), summed over each response's tokens with the
    starting weights, averaged over the batch: TRL's logged loss of step 1 (one micro-batch = the batch)."""
    from posttrain import models
    from posttrain.metrics import MetricsLogger
    from posttrain.preference.dpo import _trainer

    cfg = tiny(tmp_path, "dpo.reference=free", "dpo.beta=0.5", "train.batch_size=4", "train.micro_batch_size=4",
               "train.max_steps=1")
    tokenizer = models.tokenizer_for(cfg.model)
    model = models.model_for(cfg.model, "cpu")
    rows = preference_rows(limit=4)
    logger = MetricsLogger(tmp_path, stage="dpo", loggers=["jsonl"], ray_metrics=False)
    trainer = _trainer(cfg, model, tokenizer, rows, rows, logger)
    batch = list(trainer.train_dataset)
    with torch.no_grad():
        margins = [_sum_logprob(model, r["prompt_ids"], r["chosen_ids"]) - _sum_logprob(model, r["prompt_ids"], r["rejected_ids"])
                   for r in batch]
    expected = sum(-math.log(1 / (1 + math.exp(-0.5 * m))) for m in margins) / len(margins)
    trainer.train()
    logger.close()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(expected, rel=1e-4)
    assert all(r["ref_chosen_logps"] == 0.0 for r in trainer.train_dataset)  # reference-free: no reference


def test_dpo_stage_run_folder_checkpoints_and_resume(tmp_path, tiny_llama_dir, capsys):
    from posttrain.cli import main

    assert main(["dpo", "--config", str(CONFIGS / "dpo" / "tiny_smoke.yaml"), f"run_dir={tmp_path}"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval/dpo/likelihood_accuracy" in r]
    assert [r["step"] for r in evals] == [0, 2] and evals[0]["eval/dpo/pairs"] == 4
    assert evals[0]["eval/dpo/reward_accuracy"] == 0.0  # the policy is its own reference before training
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    assert (tmp_path / "model" / "config.json").is_file() and (tmp_path / "config.yaml").is_file()
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["checkpoint-2"]  # keep_last 1, no staging left behind
    with pytest.raises(ConfigError, match="pass --resume"):
        from posttrain.preference.dpo import train

        train(tiny(tmp_path))
    assert main(["dpo", "--config", str(CONFIGS / "dpo" / "tiny_smoke.yaml"), f"run_dir={tmp_path}", "--resume"]) == 0
    again = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in again if "train/loss" in r] == [1, 2]  # nothing trained twice
    assert [r["step"] for r in again if "eval/dpo/likelihood_accuracy" in r] == [0, 2]  # nor measured twice


def test_a_checkpoint_killed_mid_save_is_never_visible(tmp_path):
    from types import SimpleNamespace

    from posttrain.preference.trl_run import save_atomically

    root = tmp_path / "checkpoints"
    trainer = SimpleNamespace(args=SimpleNamespace(output_dir=str(root), save_total_limit=2, should_save=True),
                              state=SimpleNamespace(global_step=3))

    def dies(model, trial):
        (Path(trainer.args.output_dir) / "checkpoint-3").mkdir(parents=True)
        (Path(trainer.args.output_dir) / "checkpoint-3" / "model.safetensors").write_text("half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_atomically(trainer, dies, None, None)
    assert not (root / "checkpoint-3").exists() and trainer.args.output_dir == str(root)

    def writes(model, trial):
        (Path(trainer.args.output_dir) / f"checkpoint-{trainer.state.global_step}").mkdir(parents=True)

    for step in (3, 4, 5):
        trainer.state.global_step = step
        save_atomically(trainer, writes, None, None)
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-4", "checkpoint-5"]  # rotated, staging gone
