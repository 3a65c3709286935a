"""Step metrics to three places: ``metrics.jsonl`` in the run folder, TensorBoard events, and
Ray custom metrics (``ray.util.metrics`` gauges, shown on the dashboard's metrics endpoint with
a ``ray_`` prefix). Each sink is optional and a failing sink never stops training.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from contextlib import contextmanager
from collections.abc import Iterator
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")
REFRESH_S = 5.0  # Ray drops a gauge ~20 s after its last set


def gauge_name(key: str, prefix: str = "posttrain") -> str:
    """``env/math/reward`` -> ``posttrain_env_math_reward`` (Prometheus-safe)."""
    return f"{prefix}_{_UNSAFE.sub('_', key)}"


class MetricsLogger:
    def __init__(self, run_dir: str | Path, *, stage: str, tensorboard: bool = True, ray_metrics: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except Exception as exc:  # tensorboard missing: the JSONL still has everything
                log.warning("TensorBoard events disabled: %s", exc)
        self._ray = ray_metrics
        self._gauges: dict[str, Any] = {}
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._refresher: threading.Thread | None = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        self._jsonl.write(json.dumps({"stage": self.stage, "step": step, "time": time.time(), **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._ray:
            self._to_ray(step, clean)

    def log_text(self, step: int, tag: str, text: str) -> None:
        """Markdown ``text`` under ``tag`` in TensorBoard's text tab (nothing when TensorBoard is off)."""
        if self._tb is not None:
            try:
                self._tb.add_text(tag, text, step)
                self._tb.flush()
            except Exception as exc:  # noqa: BLE001 - a sink never stops training
                log.warning("TensorBoard text %r not written: %s", tag, exc)

    def _to_ray(self, step: int, metrics: dict[str, float]) -> None:
        try:
            import ray
            from ray.util.metrics import Gauge

            if not ray.is_initialized():
                return
            with self._lock:
                for k, v in {"step": float(step), **metrics}.items():
                    name = gauge_name(k)
                    if name not in self._gauges:
                        self._gauges[name] = Gauge(name, description=f"posttrain {k}", tag_keys=("stage",))
                    self._gauges[name].set(v, tags={"stage": self.stage})
                    self._last[name] = v
            self._start_refresh()
        except Exception as exc:  # metrics must never stop a step
            log.warning("Ray metrics disabled: %s", exc)
            self._ray = False

    def _start_refresh(self) -> None:
        """Ray 2.60 exports a gauge only for ~20 s after it was set, and RL steps take longer:
        a daemon thread re-sets the last values every ``REFRESH_S`` until :meth:`close`."""
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
        self._stop.set()
        if self._refresher is not None:
            self._refresher.join(timeout=5)
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


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
