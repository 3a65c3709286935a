"""Run untrusted Python in the strongest isolation this machine offers, and talk to it safely.

Isolation, strongest first:
- ``bwrap``: bubblewrap started as a *real* unprivileged uid (root with ``--uid N`` would
  still be host root inside), fresh user/pid/net/ipc/uts/cgroup namespaces, no nested user
  namespaces, only ``/usr`` visible (read-only), ``/`` and ``/dev`` read-only, the only writable
  storage two sized tmpfs (``/tmp`` and ``/dev/shm``, ``Limits.tmpfs_mb`` together),
  ``--die-with-parent --new-session``, no_new_privs, and a seccomp filter (see ``seccomp``).
  bwrap's own pid 1 runs unfiltered next to the candidate, so its ``/proc/1`` is hidden and
  ptrace-like calls are denied.
- ``rlimits``: the fallback — rlimits, its own session/process group, an unprivileged uid
  and cgroup when we are root, a private working folder, and an empty network namespace
  (``unshare --net``) where one can be made; a loud warning names what is missing. Without a
  network namespace it refuses to run while a Ray cluster is up in this process: the host's
  loopback reaches Ray's dashboard/job API, which runs shell commands.

Both: the rlimits are set by ``prlimit`` *before* ``exec bwrap`` (see ``launch``) (so every process of the run,
bwrap's included, inherits them), and as root a per-run cgroup caps total memory, processes
and CPU (``Limits.cpus``: a spinning run cannot starve its neighbours). Each run leases a uid
from a rotating pool (see ``uids``); afterwards every process of that uid is SIGKILLed, so
nothing outlives a call. Deadlines are enforced from outside with ``poll``; we never wait for
pipe EOF (a daemon could hold the pipe open). Landlock is not applied (listed as missing).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from typing import Any

from posttrain.verifiers import cgroups, launch, seccomp
from posttrain.verifiers.uids import UID_BASE, UID_COUNT, UidError, UidLease, drop_to, kill_uid, remove_files_of

log = logging.getLogger(__name__)



class SandboxError(RuntimeError):
    """The sandbox itself could not start or misbehaved: an infrastructure failure, never a 0."""


@dataclasses.dataclass(frozen=True)
class Limits:
    """Resource limits of one sandboxed run (the whole conversation with one program)."""

    wall_s: float = 10.0  # whole run, enforced from outside
    cpu_s: int = 10  # RLIMIT_CPU per process (SIGXCPU, then SIGKILL one second later)
    memory_mb: int = 1024  # RLIMIT_AS per process: a clean MemoryError inside
    run_memory_mb: int = 2048  # all processes of the run together, tmpfs included (cgroup, if available)
    processes: int = 32  # RLIMIT_NPROC for the run's uid
    file_size_mb: int = 16  # RLIMIT_FSIZE
    open_files: int = 64  # RLIMIT_NOFILE
    tmpfs_mb: int = 64  # all writable storage together (bwrap): 3/4 is /tmp, 1/4 /dev/shm; the rest is read-only
    cpus: float = 1.0  # CPU time of the whole run per second of wall time (cgroup quota, if available); 0: no cap
    log_bytes: int = 64 * 1024  # stdout+stderr kept for diagnostics; the rest is drained
    reply_bytes: int = 8 * 1024 * 1024  # one reply line; more is an output-limit failure
    start_s: float = 5.0  # the runner must say hello within this (else: infrastructure error)

    def __post_init__(self) -> None:
        if self.tmpfs_mb < 2:
            raise ValueError(f"Limits.tmpfs_mb must be >= 2 (1 MiB each for /tmp and /dev/shm; got {self.tmpfs_mb})")
        if self.cpus < 0:
            raise ValueError(f"Limits.cpus must be >= 0 (0 means no CPU cap; got {self.cpus})")

    def rlimits(self) -> dict[str, tuple[int, int]]:
        mb = 1024 * 1024
        return {
            "RLIMIT_AS": (self.memory_mb * mb, self.memory_mb * mb),
            "RLIMIT_CPU": (self.cpu_s, self.cpu_s + 1),
            "RLIMIT_NPROC": (self.processes, self.processes),
            "RLIMIT_FSIZE": (self.file_size_mb * mb, self.file_size_mb * mb),
            "RLIMIT_NOFILE": (self.open_files, self.open_files),
            "RLIMIT_CORE": (0, 0),
        }

    def tmpfs_bytes(self) -> tuple[int, int]:
        """Sizes of the sandbox's /tmp and /dev/shm: together exactly ``tmpfs_mb``."""
        shm_mb = max(1, self.tmpfs_mb // 4)
        return (self.tmpfs_mb - shm_mb) << 20, shm_mb << 20


@dataclasses.dataclass(frozen=True)
class Isolation:
    """What protections runs actually get here (printed by tests and the benchmark)."""

    kind: str  # "bwrap" or "rlimits"
    python: str  # interpreter used inside the sandbox
    drop_uid: bool  # True when runs use a dedicated unprivileged uid (we are root)
    missing: tuple[str, ...] = ()
    cgroup: str | None = None  # "v1"/"v2": a per-run cgroup caps total memory and processes
    cpu_cap: bool = False  # the per-run cgroup also caps CPU (Limits.cpus)
    seccomp: int = 0  # bwrap: syscalls the seccomp filter denies (0: no filter)
    network: tuple[str, ...] = ()  # rlimits: argv prefix giving each run an empty network namespace

    def describe(self) -> str:
        who = f"uids {UID_BASE}-{UID_BASE + UID_COUNT - 1}" if self.drop_uid else f"own uid {os.getuid()}"
        text = f"{self.kind} as {who}, python {self.python}"
        text += f", seccomp filter ({self.seccomp} syscalls denied)" if self.seccomp else ""
        text += ", own network namespace (unshare)" if self.network else ""
        caps = "total memory + pids + CPU cap" if self.cpu_cap else "total memory + pids cap"
        text += f", cgroup {self.cgroup} ({caps})" if self.cgroup else ""
        return text + (f"; MISSING: {', '.join(self.missing)}" if self.missing else "")


def _sandbox_python() -> str:
    """A system interpreter the unprivileged uid can read (a venv under /root is not)."""
    for candidate in (os.environ.get("POSTTRAIN_SANDBOX_PYTHON"), "/usr/bin/python3", "/usr/local/bin/python3"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise SandboxError("no python3 for the sandbox: install python3 under /usr/bin or set POSTTRAIN_SANDBOX_PYTHON")


@functools.cache
def detect_isolation(mode: str | None = None) -> Isolation:
    """Probe once per process. ``mode`` (or $POSTTRAIN_SANDBOX) forces "bwrap" or "rlimits"."""
    mode = mode or os.environ.get("POSTTRAIN_SANDBOX") or "auto"
    if mode not in ("auto", "bwrap", "rlimits"):
        raise ValueError(f"sandbox mode must be auto, bwrap or rlimits (got {mode!r})")
    python, root = _sandbox_python(), os.geteuid() == 0
    missing = []
    if not root:
        missing.append("dedicated uid (runs as your own uid and can touch your files)")
    cgroup = cgroups.mode() if root and os.environ.get("POSTTRAIN_SANDBOX_CGROUP", "1") != "0" else None
    cpu_cap = bool(cgroup) and cgroups.has_cpu_cap(cgroup)
    if cgroup is None:
        missing.append("cgroup (memory cap is per process, not per run)")
    if not cpu_cap:
        missing.append("per-run CPU cap (a run's processes compete for every core)")
    if mode != "rlimits" and shutil.which("bwrap"):
        try:
            seccomp.filter_bytes()
            filters: list[tuple[int, tuple[str, ...]]] = [(len(seccomp.denied_names()), ())]
        except seccomp.SeccompUnavailable as exc:
            filters = []
            missing.append(f"seccomp syscall filter ({exc})")
        filters.append((0, ("seccomp syscall filter (bwrap refused it)",) if filters else ()))
        for denied, more in filters:
            iso = Isolation("bwrap", python, root, (*missing, *more, "landlock"), cgroup, cpu_cap, denied)
            try:
                with Sandbox(Limits(wall_s=10, start_s=10), iso) as probe:
                    probe.start("pass", None)
                log.debug("sandbox: %s", iso.describe())
                return iso
            except SandboxError as exc:
                error = exc
        if mode == "bwrap":
            raise error
        log.warning("bubblewrap is installed but does not work here (%s)", error)
    elif mode == "bwrap":
        raise SandboxError("bwrap not found: apt-get install bubblewrap (scripts/install.sh does it as root)")
    network = launch.network_namespace()
    missing += ["seccomp syscall filter", "landlock", "filesystem view (host files readable, world-writable folders "
                "writable)", "pid namespace", "fixed-size tmpfs (only per-file size cap)"]
    if not network:
        missing.append("network isolation (refuses to run while Ray is up)")
    iso = Isolation("rlimits", python, root, tuple(missing), cgroup, cpu_cap, 0, network)
    log.warning("SANDBOX IS WEAK: %s. Install bubblewrap for namespaces.", iso.describe())
    return iso


class Sandbox:
    """One sandboxed runner process; ``request`` sends a JSON object and waits for its reply.

    Use as a context manager: on exit the whole process tree is killed and the uid swept.
    """

    def __init__(self, limits: Limits | None = None, isolation: Isolation | None = None) -> None:
        self.limits = limits or Limits()
        self.isolation = isolation or detect_isolation()
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = bytearray()
        self._buf = bytearray()
        self._lease: UidLease | None = None
        self._slot: cgroups.Slot | None = None
        self._tmp: str | None = None
        self._deadline = 0.0
        self._req_w: int | None = None
        self._rep_r: int | None = None
        self._log_r: int | None = None

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _command(self, req_fd: int, rep_fd: int, filter_fd: int | None) -> list[str]:
        """prlimit (so bwrap and everything under it inherit the limits), bwrap, the runner."""
        return launch.argv(self.isolation.kind, self.isolation.python, self.limits.rlimits(),
                           self.limits.tmpfs_bytes(), (req_fd, rep_fd), filter_fd)

    def _identity(self) -> tuple[list[str], dict[str, Any], str]:
        """Lease a uid (and a cgroup slot) when we are root; returns argv prefix, Popen kwargs, cwd.

        The prefix: [join the cgroup (v2)] [own network namespace (rlimits)] [drop to the uid].
        """
        join: list[str] = []
        drop: list[str] = []
        kwargs: dict[str, Any] = {}
        if not launch.prlimit():
            kwargs["preexec_fn"] = functools.partial(launch.set_rlimits, self.limits.rlimits())
        if self.isolation.drop_uid:
            try:
                self._lease = UidLease()
                drop, more = drop_to(self._lease.uid)
                kwargs.update(more)
                if self.isolation.cgroup:
                    cpus = self.limits.cpus if self.isolation.cpu_cap else 0
                    # pids: the run's processes, bwrap's two and slack
                    self._slot = cgroups.lease(self.isolation.cgroup, self.limits.run_memory_mb << 20,
                                               self.limits.processes + 4, cpus)
                    join = [] if self._slot.in_thread else self._slot.cgroup.wrapper()
            except (UidError, OSError, ValueError) as exc:
                raise SandboxError(f"could not prepare the sandbox uid/cgroup: {exc}") from exc
        return [*join, *self.isolation.network, *drop], kwargs, self._workdir()

    def _workdir(self) -> str:
        if self.isolation.kind == "bwrap":
            return "/"
        self._tmp = tempfile.mkdtemp(prefix="posttrain-sandbox-")  # no private tmpfs: a private folder
        if self._lease:
            os.chown(self._tmp, self._lease.uid, self._lease.uid)
        return self._tmp

    def start(self, source: str, entry_point: str | None) -> dict[str, Any]:
        """Start the runner, load ``source``; returns its setup reply (``status`` "ready" or why not)."""
        if self.isolation.kind != "bwrap" and not self.isolation.network and launch.ray_cluster_up():
            raise SandboxError(
                "refusing to run untrusted code: the rlimits fallback has no network isolation (`unshare --net` "
                "failed here) and a Ray cluster is up in this process, whose dashboard/job API on 127.0.0.1 runs "
                "shell commands. Install bubblewrap (apt-get install bubblewrap), or allow network namespaces "
                f"(root, or unprivileged user namespaces). Isolation: {self.isolation.describe()}")
        prefix, kwargs, cwd = self._identity()
        self._deadline = time.monotonic() + self.limits.wall_s
        req_r, self._req_w = os.pipe()
        self._rep_r, rep_w = os.pipe()
        self._log_r, log_w = os.pipe()
        for fd in (self._req_w, self._rep_r, self._log_r):
            os.set_blocking(fd, False)
        filter_fd = seccomp.filter_pipe() if self.isolation.kind == "bwrap" and self.isolation.seccomp else None
        passed = (req_r, rep_w) if filter_fd is None else (req_r, rep_w, filter_fd)
        env = {"PATH": "/usr/bin:/bin", "HOME": cwd, "LANG": "C.UTF-8"}
        argv = prefix + self._command(req_r, rep_w, filter_fd)
        popen = functools.partial(subprocess.Popen, argv, stdin=subprocess.DEVNULL, stdout=log_w, stderr=log_w,
                                  pass_fds=passed, cwd=cwd, env=env, start_new_session=True, **kwargs)
        try:
            self.proc = self._slot.spawn(popen) if self._slot else popen()  # a slot forks inside its cgroup
        except OSError as exc:
            raise SandboxError(f"could not start the sandbox: {exc}") from exc
        finally:
            for fd in (*passed, log_w):
                os.close(fd)
        hello = self._read_reply(min(self._deadline, time.monotonic() + self.limits.start_s))
        if not hello or hello.get("status") != "hello":
            raise SandboxError(f"sandbox could not start ({self.isolation.kind}): {hello} {self.log_text()[-500:]!r}")
        return self.request({"source": source, "entry_point": entry_point})

    def request(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Send one request; the reply, or ``{"status": timeout|crash|output_limit}``."""
        data = (json.dumps(obj) + "\n").encode()
        while data:
            if not self._wait(self._req_w, select.POLLOUT):
                return self._failed()
            try:
                data = data[os.write(self._req_w, data):]
            except BlockingIOError:
                continue
            except BrokenPipeError:
                return self._failed()
        reply = self._read_reply(self._deadline)
        return reply if reply is not None else self._failed()

    def _failed(self) -> dict[str, Any]:
        """Why no reply came: out of time, reply too large, or the program died."""
        if time.monotonic() >= self._deadline:
            return {"status": "timeout", "message": f"wall limit {self.limits.wall_s}s"}
        if len(self._buf) > self.limits.reply_bytes:
            return {"status": "output_limit", "message": f"reply over {self.limits.reply_bytes} bytes"}
        try:
            code = self.proc.wait(timeout=0.2) if self.proc else None
        except subprocess.TimeoutExpired:
            code = None
            self.kill()
        if code in (-signal.SIGXCPU, 128 + signal.SIGXCPU):  # bwrap reports a child's signal as 128+N
            return {"status": "timeout", "message": f"CPU limit {self.limits.cpu_s}s"}
        if self._slot and self._slot.cgroup.hit_memory_limit():
            return {"status": "memory", "message": f"run memory cap {self.limits.run_memory_mb} MiB (cgroup)"}
        return {"status": "crash", "message": f"program ended without answering (exit {code})"}

    def _wait(self, fd: int, event: int) -> bool:
        """Poll ``fd`` for ``event`` while draining the log; False once the deadline passes."""
        poller = select.poll()
        poller.register(fd, event | select.POLLHUP | select.POLLERR)
        poller.register(self._log_r, select.POLLIN)
        while (left := self._deadline - time.monotonic()) > 0:
            ready = dict(poller.poll(max(1, int(left * 1000))))
            if self._log_r in ready:
                self._drain_log(poller)
            if fd in ready:
                return bool(ready[fd] & (event | select.POLLHUP | select.POLLERR))
        return False

    def _drain_log(self, poller: select.poll) -> None:
        try:
            chunk = os.read(self._log_r, 1 << 16)
        except BlockingIOError:
            return
        if not chunk:
            poller.unregister(self._log_r)
        elif len(self.log) < self.limits.log_bytes:
            self.log += chunk[: self.limits.log_bytes - len(self.log)]

    def _read_reply(self, deadline: float) -> dict[str, Any] | None:
        saved, self._deadline = self._deadline, deadline
        try:
            while b"\n" not in self._buf:
                if len(self._buf) > self.limits.reply_bytes or not self._wait(self._rep_r, select.POLLIN):
                    return None
                try:
                    chunk = os.read(self._rep_r, 1 << 20)
                except BlockingIOError:
                    continue
                if not chunk:
                    return None
                self._buf += chunk
            line, _, rest = bytes(self._buf).partition(b"\n")
            self._buf = bytearray(rest)
            try:
                reply = json.loads(line)
            except (ValueError, RecursionError):
                return {"status": "malformed", "message": "reply is not JSON"}
            return reply if isinstance(reply, dict) else {"status": "malformed", "message": "reply is not an object"}
        finally:
            self._deadline = saved

    def log_text(self) -> str:
        return self.log.decode(errors="replace")

    def kill(self) -> None:
        """Kill the whole tree: the session, then every process of the run's uid.

        Straight to SIGKILL, also after a clean run: measured 7 ms vs 15 ms for closing the
        request pipe and waiting for the runner to exit on its own.
        """
        if self.proc and self.proc.returncode is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired as exc:
                raise SandboxError(f"sandbox pid {self.proc.pid} survived SIGKILL") from exc
        if self._lease:
            try:
                kill_uid(self._lease.uid)
            except UidError as exc:
                raise SandboxError(str(exc)) from exc

    def close(self) -> None:
        try:
            self.kill()
            if self._slot:  # only a swept slot is reused
                cgroups.release(self._slot)
        finally:
            self._slot = None
            for name in ("_req_w", "_rep_r", "_log_r"):
                fd = getattr(self, name, None)
                if fd is not None:
                    os.close(fd)
                    setattr(self, name, None)
            if self._lease:
                if self.isolation.kind != "bwrap":
                    remove_files_of(self._lease.uid)
                self._lease.release()
                self._lease = None
            if self._tmp:
                shutil.rmtree(self._tmp, ignore_errors=True)
                self._tmp = None
