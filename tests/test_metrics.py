"""Step metrics reach metrics.jsonl, TensorBoard and Ray's Prometheus endpoint."""

from __future__ import annotations

import json
import socket
import time
import urllib.request
from pathlib import Path

from posttrain.metrics import MetricsLogger, PhaseTimer, gauge_name
from posttrain.orchestration import cluster


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def test_metrics_reach_jsonl_tensorboard_and_ray_endpoint(tmp_path):
    port = free_port()
    cluster.shutdown_ray()  # a Ray left running by earlier tests would keep its own metrics port
    cluster.init_ray(temp_dir="/tmp/ray-posttrain-metrics-test", num_cpus=1, metrics_export_port=port)
    try:
        logger = MetricsLogger(tmp_path, stage="rlvr")
        logger.log(3, {"reward/mean": 0.625, "env/math/pass_rate": 0.5})
        row = json.loads((tmp_path / "metrics.jsonl").read_text())
        assert row["step"] == 3 and row["reward/mean"] == 0.625 and row["stage"] == "rlvr"
        assert list((tmp_path / "tensorboard").iterdir())
        found = wait_for(port, "ray_posttrain_reward_mean{", time.time() + 60)
        assert found and found[0].endswith(" 0.625") and 'stage="rlvr"' in found[0]
        # Ray forgets a gauge ~20 s after its last set; an RL step can take minutes: still there
        time.sleep(30)
        again = wait_for(port, "ray_posttrain_reward_mean{", time.time() + 5)
        assert again and again[0].endswith(" 0.625")
        logger.close()
    finally:
        cluster.shutdown_ray()


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
