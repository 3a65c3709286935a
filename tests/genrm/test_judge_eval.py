"""The GenRM stage's judge eval: which pairs, which judge settings, logged once before and once after."""

from __future__ import annotations

import json

import pytest

from posttrain.config import load_config
from posttrain.genrm import train as genrm_train
from posttrain.genrm.config import GenRMTrainConfig


@pytest.fixture
def judged(monkeypatch):
    calls = []

    def fake_quality(cfg, pairs):
        calls.append((cfg, pairs))
        return {"pairwise_accuracy": 0.5, "pairwise_accuracy_both_orders": 0.6, "n_pairs": float(len(pairs)),
                "n_judgements": 2.0 * len(pairs), "n_readable": 2.0 * len(pairs),
                "pairwise_accuracy/helpfulness": 0.7}

    monkeypatch.setattr(genrm_train, "judge_quality", fake_quality)
    return calls


def stage(tmp_path, *overrides):
    return load_config(GenRMTrainConfig, None, [
        f"run_dir={tmp_path}", "model.name=tiny-llama", "generation.temperature=0.8",
        'environments=[{name: genrm_preference, options: {test_size: 6, prompt_style: compact, both_orders: true}}]',
        *overrides])


def rows(tmp_path):
    return [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_before_and_after_each_logged_once(tmp_path, judged):
    cfg = stage(tmp_path)
    genrm_train.log_judge_eval(cfg, "tiny-llama", before=True)
    genrm_train.log_judge_eval(cfg, "tiny-llama", before=True)  # a resumed stage: not judged again
    (tmp_path / "metrics.jsonl").open("a").write(json.dumps({"stage": "genrm", "step": 7, "loss": 1.0}) + "\n")
    genrm_train.log_judge_eval(cfg, str(tmp_path / "model"), before=False)
    genrm_train.log_judge_eval(cfg, str(tmp_path / "model"), before=False)
    assert len(judged) == 2
    logged = [r for r in rows(tmp_path) if "eval/genrm_judge/prompts" in r]
    assert [r["step"] for r in logged] == [0, 7]
    assert logged[0]["eval/genrm_judge/pairwise_accuracy_both_orders"] == 0.6
    assert not any("/helpfulness" in k for r in logged for k in r)  # per-category figures stay in genrm eval


def test_judges_every_test_pair_once_as_rlhf_reads_it(tmp_path, judged):
    genrm_train.log_judge_eval(stage(tmp_path, "judge_eval.limit=4"), "base", before=True)
    cfg, pairs = judged[0]
    # the environment's own both_orders doubles its samples; the eval takes each labelled pair once
    # and judges it in both orders itself
    assert len(pairs) == 4 and len({p.id for p in pairs}) == 4
    assert cfg.both_orders and cfg.scoring == "expected" and cfg.prompt_style == "compact"
    assert cfg.generation.temperature == 0.0 and cfg.model.name == "base"


def test_no_preference_environment_skips_with_a_warning(tmp_path, judged, caplog):
    cfg = stage(tmp_path, 'environments=[{name: math, options: {size: 4, test_size: 2}}]')
    genrm_train.log_judge_eval(cfg, "base", before=True)
    assert not judged and "no genrm_preference environment" in caplog.text
