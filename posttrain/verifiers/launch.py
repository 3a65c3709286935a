"""How a sandboxed run is launched: the argv (prlimit, bwrap, the runner) and the helpers it needs.

Kept apart from ``sandbox`` (which talks to the running program) so each reads on its own:
rlimits are set by util-linux ``prlimit`` *before* ``exec bwrap`` (every process of the run,
bwrap's pid 1 included, inherits them); the runner is precompiled once per interpreter; the
rlimits fallback gets an empty network namespace where one can be made.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import resource
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

RUNNER_SOURCE = (Path(__file__).with_name("_runner.py")).read_text()
_PRLIMIT_FLAGS = {"RLIMIT_AS": "--as", "RLIMIT_CPU": "--cpu", "RLIMIT_NPROC": "--nproc", "RLIMIT_FSIZE": "--fsize",
                  "RLIMIT_NOFILE": "--nofile", "RLIMIT_CORE": "--core"}


def ray_cluster_up() -> bool:
    """Is this process attached to a Ray cluster (a driver after ``ray.init``, or a Ray actor)?

    Only our own cluster is seen (Ray loaded here, never imported for the check); a cluster some
    other process started on this host is not, which is why the fallback always takes a network
    namespace when it can get one.
    """
    ray = sys.modules.get("ray")
    is_initialized = getattr(ray, "is_initialized", None)
    return bool(is_initialized and is_initialized())


@functools.cache
def network_namespace() -> tuple[str, ...]:
    """argv prefix running a command in a new, empty network namespace; () when none works here.

    As root ``unshare --net`` (before the uid is dropped); otherwise a user namespace around it.
    """
    unshare = shutil.which("unshare")
    if not unshare:
        return ()
    tries = [[unshare, "--user", "--map-current-user", "--net", "--"]]
    if os.geteuid() == 0:
        tries.insert(0, [unshare, "--net", "--"])
    for prefix in tries:
        try:
            subprocess.run([*prefix, "true"], check=True, timeout=10, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            return tuple(prefix)
        except (OSError, subprocess.SubprocessError):
            continue
    return ()


@functools.cache
def runner_bytecode(python: str) -> str | None:
    """RUNNER_SOURCE compiled by the sandbox's interpreter; runs then skip a ~4 ms compile.

    One .pyc per (runner source, interpreter build), shared by our processes in a folder only
    we can write and the run's uid can read (a Ray actor killed without atexit leaves nothing
    new behind). None if it cannot be made: runs then pass the source with ``-c``.
    """
    folder = Path(tempfile.gettempdir()) / f"posttrain-runner-{os.geteuid()}"
    try:
        real = os.path.realpath(python)
        key = f"{RUNNER_SOURCE}\0{real}\0{os.stat(real).st_mtime_ns}".encode()
        pyc = folder / f"{hashlib.sha256(key).hexdigest()[:24]}.pyc"
        folder.mkdir(mode=0o755, exist_ok=True)
        info = os.lstat(folder)
        if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o022:
            raise OSError(f"{folder} is not a folder only we can write")
        if not pyc.exists():
            source = folder / f"{pyc.stem}.{os.getpid()}.py"
            partial = folder / f"{pyc.stem}.{os.getpid()}.tmp"
            source.write_text(RUNNER_SOURCE)
            compile_it = "import py_compile, sys; py_compile.compile(sys.argv[1], sys.argv[2], doraise=True)"
            try:
                subprocess.run([python, "-I", "-S", "-c", compile_it, str(source), str(partial)], check=True,
                               timeout=60, stdin=subprocess.DEVNULL, capture_output=True)
            finally:
                source.unlink(missing_ok=True)
            partial.chmod(0o644)
            os.replace(partial, pyc)  # atomic: other processes see the whole file or none
    except (OSError, subprocess.SubprocessError) as exc:
        log.warning("could not precompile the sandbox runner with %s (%s); passing its source instead", python, exc)
        return None
    return str(pyc)


@functools.cache
def prlimit() -> str | None:
    return shutil.which("prlimit")


def set_rlimits(limits: dict[str, tuple[int, int]]) -> None:
    """preexec_fn fallback when util-linux ``prlimit`` is missing (slower: no vfork)."""
    for name, value in limits.items():
        resource.setrlimit(getattr(resource, name), value)


def argv(kind: str, python: str, rlimits: dict[str, tuple[int, int]], tmpfs_bytes: tuple[int, int],
         fds: tuple[int, int], filter_fd: int | None) -> list[str]:
    """The command of one run: ``kind`` "bwrap" or "rlimits"; ``fds`` the request and reply pipes."""
    req_fd, rep_fd = fds
    pyc = runner_bytecode(python)
    if pyc and not os.path.exists(pyc):  # a /tmp cleaner took it: compile again
        runner_bytecode.cache_clear()
        pyc = runner_bytecode(python)
    code = ["-c", RUNNER_SOURCE] if pyc is None else ["/runner.pyc" if kind == "bwrap" else pyc]
    runner = [python, "-I", "-S", *code, str(req_fd), str(rep_fd), json.dumps(rlimits)]
    tool = prlimit()
    limited = [tool, *[f"{_PRLIMIT_FLAGS[n]}={s}:{h}" for n, (s, h) in rlimits.items()], "--"] if tool else []
    if kind != "bwrap":
        return [*limited, *runner]
    tmp_bytes, shm_bytes = tmpfs_bytes
    return [*limited, "bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent",
            "--new-session", "--cap-drop", "ALL", "--hostname", "sandbox",
            "--ro-bind", "/usr", "/usr", "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
            "--symlink", "usr/bin", "/bin", "--proc", "/proc", "--dev", "/dev",
            *(["--ro-bind", pyc, "/runner.pyc"] if pyc else []),
            # bwrap's pid 1 is unfiltered and as old as the sandbox: hide its mem, fds, environ...
            "--size", "4096", "--tmpfs", "/proc/1", "--remount-ro", "/proc/1",
            "--size", str(tmp_bytes), "--tmpfs", "/tmp", "--size", str(shm_bytes), "--tmpfs", "/dev/shm",
            "--remount-ro", "/dev", "--remount-ro", "/",  # the only writable storage: the two sized tmpfs
            *(["--seccomp", str(filter_fd)] if filter_fd is not None else []),
            "--chdir", "/tmp", "--clearenv", "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/tmp",
            "--setenv", "LANG", "C.UTF-8", "--", *runner]
