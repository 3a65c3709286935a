"""W&B (offline) and MLflow (local SQLite store) beside metrics.jsonl: written, resumable, optional."""

from __future__ import annotations

import importlib.util
import json

import pytest

from posttrain.config import load_config
from posttrain.errors import ConfigError
from posttrain.metrics import MetricsLogger
from posttrain.pipeline import PipelineConfig


@pytest.fixture
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    return tmp_path / "run" / "rlvr"


def test_both_trackers_get_every_step_and_a_reopened_logger_continues_the_same_runs(offline):
    import mlflow

    for steps in ((1, 2), (3,)):  # a resumed stage opens its logger again
        logger = MetricsLogger(offline, stage="rlvr", loggers=["jsonl", "wandb", "mlflow"], ray_metrics=False,
                               config={"train": {"lr": 2e-5}, "run": {"steps": 3}})
        for step in steps:
            logger.log(step, {"reward/mean": step / 4, "env/math/pass_rate": 0.5})
        logger.close()
    rows = [json.loads(line) for line in (offline / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and not (offline / "tensorboard").exists()
    client = mlflow.MlflowClient(f"sqlite:///{offline / 'mlflow.db'}")
    run_id = (offline / ".mlflow_run_id").read_text()
    history = client.get_metric_history(run_id, "reward/mean")
    assert [(m.step, m.value) for m in history] == [(1, 0.25), (2, 0.5), (3, 0.75)]
    run = client.get_run(run_id)
    assert run.data.params["train.lr"] == "2e-05" and run.info.status == "FINISHED"
    offline_runs = list((offline / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len({p.name for p in offline_runs}) == 1  # one W&B run id for the folder, opened twice


def test_a_missing_tracker_package_is_a_config_error_naming_the_extra(offline, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"loggers has 'wandb' but the wandb package is not installed: "
                                          r"pip install 'posttrain\[trackers\]'"):
        MetricsLogger(offline, stage="sft", loggers=["jsonl", "wandb"], ray_metrics=False)


def test_a_tracker_that_fails_mid_run_is_dropped_not_fatal(offline, caplog):
    logger = MetricsLogger(offline, stage="rlvr", loggers=["jsonl", "mlflow"], ray_metrics=False)

    def broken(step, metrics):
        raise OSError("disk full")

    logger._trackers[0].log = broken
    logger.log(1, {"reward/mean": 0.5})
    logger.log(2, {"reward/mean": 0.5})
    logger.close()
    assert caplog.text.count("MlflowTracker disabled after an error: OSError: disk full") == 1
    assert len((offline / "metrics.jsonl").read_text().splitlines()) == 2


def test_pipeline_loggers_reach_every_stage():
    cfg = load_config(PipelineConfig, "configs/pipeline/tiny_smoke.yaml", ["loggers=[jsonl, mlflow]"])
    assert cfg.sft.loggers == cfg.rlvr.run.loggers == cfg.genrm.run.loggers == cfg.rlhf.run.loggers == ["jsonl", "mlflow"]
    with pytest.raises(ConfigError, match="loggers.1"):
        load_config(PipelineConfig, None, ["rlvr.run.loggers=[jsonl, neptune]"])
