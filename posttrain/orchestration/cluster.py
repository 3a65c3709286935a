"""Ray start/attach, named actors and calls that fail loudly instead of hanging.

Later stages (trainer, sandboxes, GenRM) reuse these: ``init_ray()`` attaches to
``RAY_ADDRESS`` when set (auth off unless ``RAY_AUTH_MODE`` says otherwise, as for the README's
``ray start`` + ``ray job submit``), else starts a private local cluster with its own temp dir
(never the shared /tmp/ray), no dashboard, and token auth with a token that lives only in this
process's environment; ``start_actor`` names actors by role (``rollout-0``) so the dashboard
shows who is who; ``gather`` turns a dead actor or a hang into a clear error.

Why the token: even without the dashboard, Ray's dashboard agent serves a job API (it runs
shell commands) on 127.0.0.1 and on the node's own IP, and GCS/raylet gRPC listen on every
interface; with auth off, any local process (or a sandboxed program that reaches the host's
loopback) could run code as us. Ray's default token would be written to ``~/.ray/auth_token``,
which switches later ``ray`` commands to token mode and breaks ``ray job submit`` to clusters
started without it; ``RAY_AUTH_TOKEN`` in our environment reaches Ray's processes and nothing else.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)
NAMESPACE = "posttrain"
DEFAULT_TEMP_DIR = "/tmp/ray-posttrain"
METRICS_REPORT_MS = 2000  # how often a private cluster's processes export metrics (Ray's default: 10 s)
_SAVED_ENV: dict[str, str | None] = {}  # what _private_token_auth replaced, put back by shutdown_ray
_TOKEN = secrets.token_hex(32)  # one per process: Ray's C++ side caches the token it first read


class ActorDiedError(RuntimeError):
    """A named actor died during a call (killed, out of memory, crashed in C code)."""


class ActorTimeoutError(TimeoutError):
    """A named actor did not answer in time (hung or far too slow)."""


def init_ray(*, address: str | None = None, temp_dir: str | None = None, num_cpus: int | None = None,
             namespace: str = NAMESPACE, dashboard: bool = False, metrics_export_port: int | None = None,
             run_dir: str | os.PathLike[str] | None = None) -> str | None:
    """Attach to ``address``/``RAY_ADDRESS`` or start a private local cluster; idempotent.

    Returns the dashboard URL when this call started or attached Ray and a dashboard runs.

    ``dashboard`` is off by default: it costs ~100 MiB and seconds of start-up that tests and
    benchmarks do not need; runs that want to watch named actors turn it on.
    ``metrics_export_port`` (default ``$POSTTRAIN_METRICS_PORT``, else a free port) fixes where
    Ray serves Prometheus metrics, ours included (``ray_posttrain_*``); the ``curl`` line that reads
    them is logged. Ray's processes export every ``METRICS_REPORT_MS`` (Ray's own default is 10 s).
    ``run_dir``: the run folder gets ``ray-session``, a link to this cluster's session folder (its
    logs and Prometheus config), which a later run does not repoint as it does ``session_latest``.
    """
    import ray

    if ray.is_initialized():
        if metrics_export_port:
            log.warning("Ray is already running; metrics_export_port=%d is ignored (Ray keeps its own)",
                        metrics_export_port)
        return None
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        return _url(ray.init(address=address, namespace=namespace, log_to_driver=True))
    _private_token_auth()
    temp_dir = temp_dir or os.environ.get("POSTTRAIN_RAY_TEMP_DIR", DEFAULT_TEMP_DIR)
    os.makedirs(temp_dir, exist_ok=True)
    # Ray 2.60 turns a loopback _node_ip_address into the host's own IP
    # (services.resolve_ip_for_localhost), so its ports listen there; keep the host firewalled.
    port = metrics_export_port or int(os.environ.get("POSTTRAIN_METRICS_PORT", "0")) or free_port()
    # address="local": a new private cluster even when TEMP_DIR/ray_current_cluster names one that
    # `ray start` left there (ray.init() would try to join it, dead or alive); RAY_ADDRESS attaches.
    url = _url(ray.init(address="local", num_cpus=num_cpus, namespace=namespace, _temp_dir=temp_dir,
                        include_dashboard=dashboard, dashboard_host="127.0.0.1", log_to_driver=True,
                        _metrics_export_port=port, _system_config={"metrics_report_interval_ms": METRICS_REPORT_MS}))
    log.info("Ray dashboard: %s; metrics: curl -s http://127.0.0.1:%d/metrics | grep ray_posttrain_",
             url or "off", port)
    if run_dir is not None:
        _link_session(Path(run_dir))
    return url


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _link_session(run_dir: Path) -> None:
    """``run_dir/ray-session`` -> this cluster's session folder (replaced atomically)."""
    try:
        import ray

        session = ray._private.worker._global_node.get_session_dir_path()
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = run_dir / f".ray-session.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(session)
        os.replace(tmp, run_dir / "ray-session")
    except Exception as exc:  # noqa: BLE001 - a convenience link never stops a run
        log.debug("no ray-session link in %s: %s", run_dir, exc)


def _private_token_auth() -> None:
    """Token auth for a private cluster, unless ``RAY_AUTH_MODE`` is set (the user's choice)."""
    if "RAY_AUTH_MODE" in os.environ:
        return
    token = os.environ.get("RAY_AUTH_TOKEN") or _TOKEN
    for key, value in (("RAY_AUTH_MODE", "token"), ("RAY_AUTH_TOKEN", token)):
        _SAVED_ENV.setdefault(key, os.environ.get(key))
        os.environ[key] = value
    _refresh_ray_config()


def _refresh_ray_config() -> None:
    """Ray caches RAY_AUTH_MODE and the token: re-read both (as Ray does when it turns tokens on itself)."""
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def _restore_env() -> None:
    if not _SAVED_ENV:
        return
    for key, value in _SAVED_ENV.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    _SAVED_ENV.clear()
    _refresh_ray_config()


def _url(context: Any) -> str | None:
    url = getattr(context, "dashboard_url", None)
    return f"http://{url}" if url and not str(url).startswith("http") else url or None


def shutdown_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _restore_env()


def start_actor(cls: type, name: str, *args: Any, num_cpus: float = 1, num_gpus: float = 0,
                env: dict[str, str] | None = None, placement: Any = None, **kwargs: Any) -> Any:
    """Start ``cls`` as the named actor ``name``; refuse if one by that name is alive.

    ``placement`` (a :class:`posttrain.orchestration.placement.Slot`) runs it inside a
    reserved bundle; ``num_cpus`` must then fit that bundle.
    """
    import ray

    try:
        ray.get_actor(name)
    except ValueError:
        pass
    else:
        raise RuntimeError(f"a Ray actor named {name!r} already exists in namespace {NAMESPACE!r}; "
                           "shut the old one down first (or use other names)")
    options: dict[str, Any] = dict(name=name, num_cpus=num_cpus, max_restarts=0, max_concurrency=1)
    if num_gpus:
        options["num_gpus"] = num_gpus
    if env:
        options["runtime_env"] = {"env_vars": dict(env)}
    if placement is not None:
        options["scheduling_strategy"] = placement.scheduling_strategy()
    return ray.remote(cls).options(**options).remote(*args, **kwargs)


def get_actor(name: str) -> Any:
    import ray

    try:
        return ray.get_actor(name)
    except ValueError:
        raise LookupError(f"no Ray actor named {name!r} in namespace {NAMESPACE!r}; is the stage running?") from None


def gather(refs: list[Any], names: list[str], timeout_s: float, what: str = "call") -> list[Any]:
    """``ray.get`` of one ref per actor, with a deadline; errors name the actor.

    A dead actor raises :class:`ActorDiedError`; a missed deadline raises
    :class:`ActorTimeoutError`; an exception inside the actor is re-raised as is (its type
    carries the meaning, e.g. ``BackendUnsupportedError``).
    """
    import ray
    from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError

    results = []
    for ref, name in zip(refs, names):
        try:
            results.append(ray.get(ref, timeout=timeout_s))
        except GetTimeoutError:
            raise ActorTimeoutError(f"{name}: {what} gave no answer within {timeout_s:g} s "
                                    "(hung or overloaded; raise the timeout if the work is just big)") from None
        except RayActorError as exc:
            raise ActorDiedError(f"{name} died during {what}: {_first_line(exc)}") from exc
        except RayTaskError as exc:
            err = exc.cause if isinstance(getattr(exc, "cause", None), Exception) else exc.as_instanceof_cause()
            if hasattr(err, "add_note"):
                err.add_note(f"(raised in Ray actor {name} during {what})")
            raise err from None
    return results


def kill_actor(handle: Any) -> None:
    import ray

    try:
        ray.kill(handle, no_restart=True)
    except Exception:  # already dead
        pass


def _first_line(exc: BaseException) -> str:
    """The informative part of a Ray error: its first few lines (pid, name, cause)."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return "; ".join(lines[:4])[:600] if lines else type(exc).__name__
