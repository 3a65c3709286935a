"""Step metrics reach metrics.jsonl, TensorBoard and Ray's Prometheus endpoint."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path

import pytest

from posttrain import metrics
from posttrain.metrics import MetricsLogger, PhaseTimer, gauge_name
from posttrain.orchestration import cluster


free_port = cluster.free_port  # a port free now; another process may take it before Ray binds it (callers retry)


def test_gauge_names_are_prometheus_safe():
    assert gauge_name("env/math/reward") == "posttrain_env_math_reward"
    assert gauge_name("time/gen_s") == "posttrain_time_gen_s"


def test_phase_timer_accumulates():
    timer = PhaseTimer()
    with timer("gen"):
        time.sleep(0.01)
    with timer("gen"):
        pass
    assert timer.seconds["time/gen_s"] >= 0.01


def wait_for(port: int, prefix: str, deadline: float) -> list[str]:
    """Lines of the metrics endpoint starting with ``prefix``, polled until ``deadline``."""
    while True:
        try:
            body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
            found = [ln for ln in body.splitlines() if ln.startswith(prefix)]
            if found or time.time() > deadline:
                return found
        except OSError:
            if time.time() > deadline:
                return []
        time.sleep(1)


def test_metrics_reach_jsonl_and_tensorboard(tmp_path):
    logger = MetricsLogger(tmp_path, stage="rlvr", ray_metrics=False)
    logger.log(3, {"reward/mean": 0.625, "env/math/pass_rate": 0.5, "note": "not a number"})
    logger.close()
    (row,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert {k: v for k, v in row.items() if k != "time"} == {
        "stage": "rlvr", "step": 3, "reward/mean": 0.625, "env/math/pass_rate": 0.5}
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_gauges_are_set_again_between_slow_steps(tmp_path, monkeypatch):
    """Ray forgets a gauge ~20 s after its last set and an RL step can take minutes: the logger sets
    the last values again every REFRESH_S until closed (counted on a stand-in gauge, no Ray)."""
    import ray
    import ray.util.metrics

    sets: list[tuple[str, float, str]] = []

    class Gauge:
        def __init__(self, name: str, description: str = "", tag_keys: tuple[str, ...] = ()) -> None:
            self.name = name

        def set(self, value: float, tags: dict[str, str]) -> None:
            sets.append((self.name, value, tags["stage"]))

    monkeypatch.setattr(ray.util.metrics, "Gauge", Gauge)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(metrics, "REFRESH_S", 0.01)
    monkeypatch.setattr(metrics, "_export_interval_s", lambda: 0.0)
    logger = MetricsLogger(tmp_path, stage="rlvr", loggers=["jsonl"])
    logger.log(3, {"reward/mean": 0.625})
    deadline = time.monotonic() + 60  # only a safety net: three refreshes take ~0.03 s
    while sets.count(("posttrain_reward_mean", 0.625, "rlvr")) < 4 and time.monotonic() < deadline:
        time.sleep(0.01)
    logger.close()
    assert sets.count(("posttrain_reward_mean", 0.625, "rlvr")) >= 4  # the log's set, then refreshes
    assert ("posttrain_step", 3.0, "rlvr") in sets
    after_close = len(sets)
    time.sleep(0.05)
    assert len(sets) == after_close  # close() stops the refreshes


def test_a_short_runs_last_metrics_and_pipeline_progress_reach_the_endpoint(tmp_path, caplog):
    """A run that logs once and ends at once: close() waits out one export, so the values are on the
    endpoint when it returns; the pipeline's progress gauge too. The curl line and the session link
    are where the run says."""
    import logging

    from posttrain.metrics import RayGauges

    caplog.set_level(logging.INFO, logger="posttrain.orchestration.cluster")
    cluster.shutdown_ray()  # a Ray left running by earlier tests keeps its own metrics port
    try:
        cluster.init_ray(temp_dir="/tmp/ray-posttrain-metrics-test", num_cpus=1, run_dir=tmp_path)
        port = int(caplog.text.split("curl -s http://127.0.0.1:")[1].split("/")[0])
        assert (tmp_path / "ray-session").resolve().name.startswith("session_")
        progress = RayGauges("pipeline")
        progress.set({"pipeline/stages_done": 2})
        logger = MetricsLogger(tmp_path, stage="rlvr", loggers=["jsonl"])
        logger.log(1, {"reward/mean": 0.375})
        logger.close()
        progress.close()
        found = wait_for(port, "ray_posttrain_reward_mean{", time.time() + 1)
        assert found and found[0].endswith(" 0.375")
        done = wait_for(port, "ray_posttrain_pipeline_stages_done{", time.time() + 1)
        assert done and 'stage="pipeline"' in done[0] and done[0].endswith(" 2.0")
    finally:
        cluster.shutdown_ray()


@pytest.mark.slow
def test_metrics_reach_the_ray_endpoint_and_stay_there(tmp_path):
    """The real thing: Ray's Prometheus endpoint shows the gauge, still 30 s after the last step."""
    for _ in range(3):  # free_port() races with other processes: another port if ours was taken
        port = free_port()
        cluster.shutdown_ray()  # a Ray left running by earlier tests would keep its own metrics port
        cluster.init_ray(temp_dir="/tmp/ray-posttrain-metrics-test", num_cpus=1, metrics_export_port=port)
        try:
            logger = MetricsLogger(tmp_path, stage="rlvr", loggers=["jsonl"])
            logger.log(3, {"reward/mean": 0.625, "env/math/pass_rate": 0.5})
            found = wait_for(port, "ray_posttrain_reward_mean{", time.time() + 60)
            if not found:
                logger.close()
                continue
            assert found[0].endswith(" 0.625") and 'stage="rlvr"' in found[0]
            time.sleep(30)  # Ray forgets a gauge two export intervals after its last set
            again = wait_for(port, "ray_posttrain_reward_mean{", time.time() + 5)
            assert again and again[0].endswith(" 0.625")
            logger.close()
            return
        finally:
            cluster.shutdown_ray()
    pytest.fail("the metrics endpoint never showed ray_posttrain_reward_mean on three ports")


def test_a_stale_cluster_file_left_by_ray_start_does_not_capture_a_local_run(tmp_path):
    """`ray start --temp-dir D` then `ray stop` leaves D/ray_current_cluster; a run must still start its own."""
    import shutil
    import tempfile

    temp = Path(tempfile.mkdtemp(prefix="/tmp/rp-"))  # Ray's socket paths must stay under 108 bytes
    (temp / "ray_current_cluster").write_text("127.0.0.1:6379")  # nothing listens there
    cluster.shutdown_ray()
    try:
        cluster.init_ray(temp_dir=str(temp), num_cpus=1)
        import ray

        assert ray.cluster_resources()["CPU"] == 1
    finally:
        cluster.shutdown_ray()
        shutil.rmtree(temp, ignore_errors=True)
