"""Step metrics to ``metrics.jsonl`` in the run folder (always), TensorBoard events, Ray custom
metrics (``ray.util.metrics`` gauges, shown on the metrics endpoint with a ``ray_`` prefix) and,
when chosen, W&B / MLflow (:mod:`posttrain.trackers`). A failing sink never stops training.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from contextlib import contextmanager
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")
REFRESH_S = 1.0  # Ray drops a gauge two export intervals (private cluster: 2 x 2 s) after its last set


def gauge_name(key: str, prefix: str = "posttrain") -> str:
    """``env/math/reward`` -> ``posttrain_env_math_reward`` (Prometheus-safe)."""
    return f"{prefix}_{_UNSAFE.sub('_', key)}"


class RayGauges:
    """Values as Ray gauges (``ray_posttrain_<key>{stage=...}`` on the metrics endpoint), kept alive.

    Ray exports a gauge only for two export intervals after its last set, and RL steps take
    longer: a daemon thread re-sets the last values every ``REFRESH_S`` until :meth:`close`, which
    first waits out one export interval so a run's last values reach the endpoint.
    """

    def __init__(self, stage: str) -> None:
        self.stage = stage
        self.enabled = True
        self._gauges: dict[str, Any] = {}
        self._last: dict[str, float] = {}
        self._last_set = 0.0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    def set(self, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        try:
            import ray
            from ray.util.metrics import Gauge

            if not ray.is_initialized():
                return
            with self._lock:
                for k, v in values.items():
                    name = gauge_name(k)
                    if name not in self._gauges:
                        self._gauges[name] = Gauge(name, description=f"posttrain {k}", tag_keys=("stage",))
                    self._gauges[name].set(v, tags={"stage": self.stage})
                    self._last[name] = v
                self._last_set = time.monotonic()
            self._start_refresh()
        except Exception as exc:  # metrics must never stop a step
            log.warning("Ray metrics disabled: %s", exc)
            self.enabled = False

    def _start_refresh(self) -> None:
        if self._refresher is not None:
            return

        def loop() -> None:
            while not self._stop.wait(REFRESH_S):
                try:
                    with self._lock:
                        for name, value in self._last.items():
                            self._gauges[name].set(value, tags={"stage": self.stage})
                except Exception as exc:  # noqa: BLE001 - Ray went away: stop refreshing
                    log.debug("metrics refresh stopped: %s", exc)
                    return

        self._refresher = threading.Thread(target=loop, name="posttrain-metrics-refresh", daemon=True)
        self._refresher.start()

    def close(self) -> None:
        if self._refresher is not None:  # let the last values be exported once (short runs)
            time.sleep(max(0.0, self._last_set + _export_interval_s() - time.monotonic()))
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join(timeout=5)


def _export_interval_s() -> float:
    try:
        import ray

        return max(ray._config.metrics_report_interval_ms(), 1000) / 1000.0 + 0.5
    except Exception:  # noqa: BLE001 - Ray gone or renamed: its default
        return 10.5


class MetricsLogger:
    """A stage's step metrics to ``RUN/metrics.jsonl`` (always), the ``loggers`` chosen (TensorBoard,
    W&B, MLflow: :mod:`posttrain.trackers`, given ``config`` as the run's parameters) and Ray gauges."""

    def __init__(self, run_dir: str | Path, *, stage: str, loggers: Sequence[str] = ("jsonl", "tensorboard"),
                 ray_metrics: bool = True, config: dict[str, Any] | None = None) -> None:
        from posttrain.trackers import open_trackers

        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        self._trackers = open_trackers(loggers, self.run_dir, stage, config)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a")
        self._tb = None
        if "tensorboard" in loggers:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except Exception as exc:  # tensorboard missing: the JSONL still has everything
                log.warning("TensorBoard events disabled: %s", exc)
        self._gauges = RayGauges(stage) if ray_metrics else None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self._jsonl.write(json.dumps({"stage": self.stage, "step": step, "time": time.time(), **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._gauges is not None:
            self._gauges.set({"step": float(step), **clean})
        for tracker in list(self._trackers):
            try:
                tracker.log(step, clean)
            except Exception as exc:  # noqa: BLE001 - a tracker never stops training
                log.warning("%s disabled after an error: %s: %s", type(tracker).__name__, type(exc).__name__, exc)
                self._trackers.remove(tracker)

    def log_text(self, step: int, tag: str, text: str) -> None:
        """Markdown ``text`` under ``tag`` in TensorBoard's text tab (nothing when TensorBoard is off)."""
        if self._tb is not None:
            try:
                self._tb.add_text(tag, text, step)
                self._tb.flush()
            except Exception as exc:  # noqa: BLE001 - a sink never stops training
                log.warning("TensorBoard text %r not written: %s", tag, exc)

    def close(self) -> None:
        if self._gauges is not None:
            self._gauges.close()
        for tracker in self._trackers:
            try:
                tracker.close()
            except Exception as exc:  # noqa: BLE001 - closing a tracker never fails a finished stage
                log.warning("%s did not close: %s", type(tracker).__name__, exc)
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def log_once(run_dir: str | Path, stage: str, step: int, values: dict[str, float],
             loggers: Sequence[str] = ("jsonl", "tensorboard")) -> None:
    """One row of metrics outside a step loop (an eval before or after a stage), to every sink."""
    logger = MetricsLogger(run_dir, stage=stage, loggers=loggers)
    try:
        logger.log(step, values)
    finally:
        logger.close()


class PhaseTimer:
    """``with timer("gen"): ...`` records ``time/gen_s``; one instance per step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[f"time/{phase}_s"] = self.seconds.get(f"time/{phase}_s", 0.0) + time.perf_counter() - start
