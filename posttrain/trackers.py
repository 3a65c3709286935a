"""Experiment trackers beside metrics.jsonl: Weights & Biases and MLflow (optional extras).

``loggers: [tensorboard, wandb, mlflow]`` in a stage's run settings adds them (``jsonl`` is always
written: the report reads it). Each tracker logs every step's metrics with the step as a value
(resumed runs log steps again, out of order: neither tracker refuses that this way) and the
resolved config as the run's parameters. One run folder is one tracker run: a stage that reopens
its logger (a resume, the GenRM's judge eval) continues the same W&B run (its id comes from the
folder) and the same MLflow run (its id is kept in ``RUN/.mlflow_run_id``).

Where they write is theirs to configure: W&B reads ``WANDB_MODE`` (``offline`` writes under
``RUN/wandb`` for ``wandb sync`` later), ``WANDB_PROJECT``, ``WANDB_API_KEY``; MLflow reads
``MLFLOW_TRACKING_URI`` and otherwise writes a local file store in ``RUN/mlruns``
(``mlflow ui --backend-store-uri RUN/mlruns``). A tracker that fails mid-run is disabled with a
warning: it never stops training.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from posttrain.atomic import atomic_write_text
from posttrain.errors import ConfigError

log = logging.getLogger(__name__)
Logger = Literal["jsonl", "tensorboard", "wandb", "mlflow"]
TRACKERS = ("wandb", "mlflow")
_PACKAGES = {"wandb": "wandb", "mlflow": "mlflow"}


def check_installed(loggers: Sequence[str]) -> None:
    """A ConfigError naming the package when a chosen tracker is not installed (at config time, not mid-run)."""
    for name in loggers:
        if name in _PACKAGES and importlib.util.find_spec(_PACKAGES[name]) is None:
            raise ConfigError(f"loggers has {name!r} but the {_PACKAGES[name]} package is not installed: "
                              f"pip install 'posttrain[trackers]' (or pip install {_PACKAGES[name]})")


def open_trackers(loggers: Sequence[str], run_dir: Path, stage: str, config: dict[str, Any] | None) -> list[Any]:
    check_installed(loggers)
    out = []
    for name in loggers:
        if name in TRACKERS:
            try:
                out.append((WandbTracker if name == "wandb" else MlflowTracker)(run_dir, stage, config or {}))
            except Exception as exc:  # noqa: BLE001 - a tracker that cannot start never stops training
                log.warning("%s tracker not started: %s: %s", name, type(exc).__name__, exc)
    return out


def _run_name(run_dir: Path, stage: str) -> str:
    return f"{run_dir.resolve().parent.name}/{run_dir.name}" if run_dir.name == stage else run_dir.name


class WandbTracker:
    def __init__(self, run_dir: Path, stage: str, config: dict[str, Any]) -> None:
        import wandb

        run_id = hashlib.sha1(str(run_dir.resolve()).encode()).hexdigest()[:16]
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "posttrain"), id=run_id, resume="allow",
                              name=_run_name(run_dir, stage), group=stage, dir=str(run_dir), config=config,
                              reinit="create_new")
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({**metrics, "step": step})

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, run_dir: Path, stage: str, config: dict[str, Any]) -> None:
        import mlflow

        self.client = mlflow.MlflowClient(os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
        id_file = run_dir / ".mlflow_run_id"
        if id_file.is_file():
            self.run_id = id_file.read_text().strip()
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name("posttrain")
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment("posttrain")
            run = self.client.create_run(experiment_id, run_name=_run_name(run_dir, stage), tags={"stage": stage})
            self.run_id = run.info.run_id
            atomic_write_text(id_file, self.run_id)
            flat = _flatten(config)
            for key, value in flat.items():
                self.client.log_param(self.run_id, key[:250], str(value)[:6000])

    def log(self, step: int, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
