"""Isolation holes of issue #15, one test per class of attack (each failed before its fix).

The probes run a ``probe(...)`` function inside the sandbox and return what they observed;
the assertions are made here, on the trusted side. bwrap-only checks skip elsewhere.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import signal
import socket
import sys
import threading
import types
from typing import Any

import pytest

from posttrain.verifiers import _runner, launch, seccomp
from posttrain.verifiers.code import INFRA, check_function, decode_value
from posttrain.verifiers.sandbox import Limits, Sandbox, SandboxError, detect_isolation

LIMITS = Limits(wall_s=5, cpu_s=4, memory_mb=512, run_memory_mb=1024, processes=32, tmpfs_mb=16)
GOOD = "def add(a, b):\n    return a + b\n"
TEST = "assert add(1, 2) == 3\nassert add(20, 22) == 42\n"


def bwrap_only() -> None:
    if detect_isolation().kind != "bwrap":
        pytest.skip("needs bubblewrap")


def probe(source: str, *args: Any, limits: Limits = LIMITS, isolation=None) -> Any:
    """Run ``probe(*args)`` of ``source`` in the sandbox; returns its (plain) value."""
    with Sandbox(limits, isolation or detect_isolation()) as box:
        ready = box.start(source, "probe")
        assert ready.get("status") == "ready", (ready, box.log_text())
        reply = box.request({"args": _runner.encode(list(args)), "kwargs": {}})
        assert reply.get("status") == "ok", (reply, box.log_text())
        return decode_value(reply["value"])


# --- (2) bwrap's pid 1 is inside the limits and out of reach -------------------------------

PID1_LIMITS = """
import resource
def probe(names):
    return [list(resource.prlimit(1, getattr(resource, n))) for n in names]
"""


def test_bwrap_pid1_runs_under_the_run_limits():
    """Limits are set before ``exec bwrap``: its pid 1 (unfiltered) gets them too."""
    bwrap_only()
    names = ["RLIMIT_AS", "RLIMIT_NPROC", "RLIMIT_CPU", "RLIMIT_NOFILE", "RLIMIT_FSIZE"]
    expected = [list(LIMITS.rlimits()[n]) for n in names]
    assert probe(PID1_LIMITS, names) == expected


PID1_REACH = """
import ctypes, os
def probe():
    out = {}
    for path in ("/proc/1/mem", "/proc/1/task/1/mem", "/proc/1/environ"):
        try:
            open(path, "r+b").close()
            out[path] = "opened"
        except OSError as exc:
            out[path] = exc.errno
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    ctypes.set_errno(0)
    attached = libc.syscall(101, 16, 1, 0, 0)  # ptrace(PTRACE_ATTACH, 1)
    out["ptrace"] = [attached, ctypes.get_errno()]
    if attached == 0:
        libc.syscall(101, 17, 1, 0, 0)  # PTRACE_DETACH
    buf = ctypes.create_string_buffer(8)
    iov = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 8)
    ctypes.set_errno(0)
    out["process_vm_writev"] = [libc.syscall(311, 1, iov, 1, iov, 1, 0), ctypes.get_errno()]
    return out
"""


def test_bwrap_pid1_memory_cannot_be_written():
    """The attack: ptrace or /proc/1/mem turn bwrap's pid 1 into an unlimited interpreter."""
    bwrap_only()
    seen = probe(PID1_REACH)
    for path in ("/proc/1/mem", "/proc/1/task/1/mem", "/proc/1/environ"):
        assert seen[path] != "opened", f"{path} of bwrap's pid 1 is writable: {seen}"
    assert seen["ptrace"] == [-1, errno.EPERM], seen
    assert seen["process_vm_writev"] == [-1, errno.EPERM], seen


SYSCALLS = """
import ctypes, os
def probe(numbers, clone_nr, clone_flags):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    out = {}
    for name, nr in numbers.items():
        ctypes.set_errno(0)
        result = libc.syscall(nr, 0, 0, 0, 0, 0, 0)
        out[name] = [result, ctypes.get_errno()]
    for flag in clone_flags:
        ctypes.set_errno(0)
        result = libc.syscall(clone_nr, flag | 17, 0, 0, 0, 0)  # 17: SIGCHLD
        if result == 0:
            os._exit(0)  # the filter let a namespace clone through: the child leaves at once
        out["clone:" + hex(flag)] = [result, ctypes.get_errno()]
    return out
"""


def test_every_denied_syscall_fails_with_eperm():
    bwrap_only()
    lib = seccomp._library()
    numbers = {name: lib.seccomp_syscall_resolve_name(name.encode()) for name in seccomp.denied_names()}
    numbers["clone3"] = lib.seccomp_syscall_resolve_name(b"clone3")
    clone = lib.seccomp_syscall_resolve_name(b"clone")
    seen = probe(SYSCALLS, numbers, clone, list(seccomp.CLONE_NAMESPACE_FLAGS))
    wrong = {name: got for name, got in seen.items()
             if got != [-1, errno.ENOSYS if name == "clone3" else errno.EPERM]}
    assert not wrong, f"not refused by the filter (result, errno): {wrong}"
    assert len(numbers) - 1 >= 40


FOREIGN_ABI = """
import ctypes, mmap, os, signal
def probe():
    pid = os.fork()
    if pid == 0:  # i386 getpid through int 0x80: a filter written for x86-64 numbers must not be bypassed
        code = bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3])  # mov eax, 20; int 0x80; ret
        page = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        page.write(code)
        ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(page)))()
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WTERMSIG(status) if os.WIFSIGNALED(status) else -os.WEXITSTATUS(status)
"""


def test_syscalls_of_another_abi_kill_the_caller():
    bwrap_only()
    if os.uname().machine != "x86_64":
        pytest.skip("int 0x80 is x86")
    assert probe(FOREIGN_ABI) == signal.SIGSYS


HONEST_PYTHON = """
import multiprocessing, subprocess, threading, concurrent.futures, os, tempfile
from multiprocessing import shared_memory
def probe():  # workers get builtins: the candidate's own functions are not importable by name
    with multiprocessing.Pool(2) as pool:
        pooled = pool.map(abs, range(0, -5, -1))
    with concurrent.futures.ProcessPoolExecutor(2) as ex:
        executed = list(ex.map(abs, [0, -1, -4]))
    box = []
    t = threading.Thread(target=box.append, args=(7,))
    t.start(); t.join()
    echoed = subprocess.run(["echo", "hi"], capture_output=True, text=True).stdout.strip()
    shm = shared_memory.SharedMemory(create=True, size=1 << 16)
    shm.buf[0] = 9
    first = shm.buf[0]
    shm.close(); shm.unlink()
    with tempfile.TemporaryFile() as fh:
        fh.write(b"x" * 1000)
    with open("/dev/null", "w") as null:
        null.write("fine")
    return [pooled, executed, box, echoed, first]
"""


def test_honest_python_still_works_under_the_filter():
    """subprocess, multiprocessing (fork + POSIX semaphores), threads, /dev/shm, /tmp, /dev/null."""
    assert probe(HONEST_PYTHON) == [[0, 1, 2, 3, 4], [0, 1, 4], [7], "hi", 9]


def test_isolation_line_shows_the_filter_and_caps():
    isolation = detect_isolation()
    text = isolation.describe()
    print(f"isolation: {text}")
    if isolation.kind == "bwrap" and seccomp.available():
        assert f"seccomp filter ({len(seccomp.denied_names())} syscalls denied)" in text
    if isolation.cgroup:
        assert "CPU" in text


def test_missing_libseccomp_is_listed(monkeypatch):
    def missing():
        raise seccomp.SeccompUnavailable("libseccomp not found: apt-get install libseccomp2")

    monkeypatch.setattr(seccomp, "filter_bytes", missing)
    isolation = detect_isolation.__wrapped__()
    if isolation.kind == "bwrap":
        assert any("libseccomp" in m for m in isolation.missing), isolation.missing
        assert "seccomp filter" not in isolation.describe().split(";")[0]


# --- (3) every writable mount is sized, the total within tmpfs_mb --------------------------

FILL = """
import os
def probe(folders, max_mb):
    written = {}
    for folder in folders:
        total = 0
        try:
            for i in range(max_mb // 4 + 1):  # RLIMIT_FSIZE caps each file: several files
                fd = os.open(os.path.join(folder, "fill%d" % i), os.O_WRONLY | os.O_CREAT, 0o600)
                try:
                    for _ in range(4):
                        total += os.write(fd, b"x" * (1 << 20))
                finally:
                    os.close(fd)
        except OSError:
            pass
        written[folder] = total >> 20
    return [written, open("/proc/self/mountinfo").read()]
"""


def test_writes_past_the_tmpfs_budget_fail_everywhere():
    bwrap_only()
    budget = LIMITS.tmpfs_mb
    written, mountinfo = probe(FILL, ["/", "/dev", "/dev/shm", "/tmp", "/proc/1"], 3 * budget)
    assert written["/"] == 0 and written["/dev"] == 0 and written["/proc/1"] == 0, written
    assert sum(written.values()) <= budget, f"{written} MiB stored against a {budget} MiB budget"
    sized = 0
    for line in mountinfo.splitlines():
        fields, _, tail = line.partition(" - ")
        point, options = fields.split()[4], fields.split()[5]
        fstype, _, super_options = tail.split()
        if "rw" not in options.split(","):
            continue
        if fstype == "tmpfs":
            size = [o for o in super_options.split(",") if o.startswith("size=")]
            assert size, f"writable tmpfs without a size at {point}: {line}"
            sized += int(size[0][5:].rstrip("k")) >> 10
        elif fstype == "devtmpfs":  # bwrap's single device nodes (/dev/null...): files, not folders
            assert point in {f"/dev/{n}" for n in ("null", "zero", "full", "random", "urandom", "tty")}, line
        else:
            assert fstype in ("proc", "devpts"), f"unexpected writable {fstype} mount at {point}"
    assert sized <= budget, f"writable tmpfs total {sized} MiB over the {budget} MiB budget"
    assert check_function(GOOD, "add", TEST, limits=LIMITS).passed


SYSV = """
import ctypes
def probe():
    libc = ctypes.CDLL(None, use_errno=True)
    out = {}
    for name, nr, args in (("shmget", 29, (0, 1 << 20, 0o1600)), ("msgget", 68, (0, 0o1600))):
        ctypes.set_errno(0)
        out[name] = [libc.syscall(nr, *args), ctypes.get_errno()]
    return out
"""


def test_sysv_shared_memory_is_refused():
    """SysV segments outlive their processes in the IPC namespace and sit outside every tmpfs cap."""
    bwrap_only()
    assert probe(SYSV) == {"shmget": [-1, errno.EPERM], "msgget": [-1, errno.EPERM]}


# --- (4) a hostile run cannot starve its neighbour's CPU -----------------------------------

SPINNERS = """
import os
def add(a, b):
    for _ in range(40):
        try:
            if os.fork() == 0:
                os.setsid()
                while True:
                    pass
        except OSError:
            break
    while True:
        pass
"""
# A fixed amount of work (a fraction of a second alone), far under the neighbour's wall limit.
HONEST_WORK = "def add(a, b):\n    x = 0\n    for i in range(3_000_000):\n        x += i & 1\n    return a + b\n"


def test_spinning_neighbour_cannot_change_an_honest_verdict():
    isolation = detect_isolation()
    if not isolation.cgroup:
        pytest.skip("per-run CPU caps need a cgroup (root)")
    hostile_limits = dataclasses.replace(LIMITS, wall_s=4, cpu_s=4)
    honest_limits = dataclasses.replace(LIMITS, wall_s=3, cpu_s=3)
    verdicts: list[Any] = []
    started = threading.Event()

    def hostile() -> None:
        started.set()
        verdicts.append(check_function(SPINNERS, "add", TEST, limits=hostile_limits))

    thread = threading.Thread(target=hostile)
    thread.start()
    started.wait()
    threading.Event().wait(0.5)  # let the spinners fork
    honest = [check_function(HONEST_WORK, "add", TEST, limits=honest_limits) for _ in range(3)]
    thread.join()
    assert verdicts and not verdicts[0].passed
    assert [r.kind for r in honest] == ["passed"] * 3, [(r.kind, r.detail) for r in honest]


def test_run_starts_inside_its_capped_cgroup():
    """The run is forked inside its slot's cgroup (no migration), whose caps are this run's."""
    isolation = detect_isolation()
    if not isolation.cgroup:
        pytest.skip("per-run cgroups need root")
    limits = dataclasses.replace(LIMITS, cpus=0.5, run_memory_mb=768)
    with Sandbox(limits, isolation) as box:
        assert box.start(GOOD, "add").get("status") == "ready"
        slot = box._slot
        assert slot is not None
        where = dict(line.split(":", 2)[1:] for line in open(f"/proc/{box.proc.pid}/cgroup").read().splitlines())
        for controller, folder in slot.cgroup.dirs.items():
            assert where[controller].endswith("/" + folder.name), (controller, where)
        if isolation.cgroup == "v1":
            assert int((slot.cgroup.dirs["memory"] / "memory.limit_in_bytes").read_text()) == 768 << 20
            if isolation.cpu_cap:
                assert (slot.cgroup.dirs["cpu"] / "cpu.cfs_quota_us").read_text().strip() == "50000"


def test_without_cgroup_the_cpu_cap_is_listed_missing(monkeypatch):
    monkeypatch.setenv("POSTTRAIN_SANDBOX_CGROUP", "0")
    isolation = detect_isolation.__wrapped__()
    assert isolation.cgroup is None
    assert any("CPU" in m for m in isolation.missing), isolation.missing


# --- (6) the rlimits fallback and the host's loopback (Ray's dashboard and job API) --------

CONNECT = """
import socket
def probe(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return "connected"
    except OSError as exc:
        return exc.errno
"""


@pytest.fixture
def listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server
    server.close()


def test_fallback_cannot_reach_host_loopback(listener):
    isolation = detect_isolation("rlimits")
    if not isolation.network:
        pytest.skip(f"no network isolation for the fallback here: {isolation.missing}")
    assert probe(CONNECT, listener.getsockname()[1], isolation=isolation) != "connected"


def test_fallback_refuses_while_ray_is_up_without_network_isolation(monkeypatch, listener):
    monkeypatch.setattr(launch, "ray_cluster_up", lambda: True)
    isolation = dataclasses.replace(detect_isolation("rlimits"), network=())
    with pytest.raises(SandboxError, match="network isolation"):
        probe(CONNECT, listener.getsockname()[1], isolation=isolation)
    result = check_function(GOOD, "add", TEST, limits=LIMITS, isolation=isolation)
    assert result.kind == INFRA and "Ray" in result.detail


def test_fallback_without_ray_and_without_netns_still_runs(monkeypatch):
    monkeypatch.setattr(launch, "ray_cluster_up", lambda: False)
    isolation = dataclasses.replace(detect_isolation("rlimits"), network=())
    assert check_function(GOOD, "add", TEST, limits=LIMITS, isolation=isolation).passed


def test_ray_cluster_up_means_ray_imported_and_initialized(monkeypatch):
    monkeypatch.delitem(sys.modules, "ray", raising=False)
    assert not launch.ray_cluster_up()
    fake = types.ModuleType("ray")
    fake.is_initialized = lambda: True  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "ray", fake)
    assert launch.ray_cluster_up()
    fake.is_initialized = lambda: False  # type: ignore[attr-defined]
    assert not launch.ray_cluster_up()


def test_private_ray_cluster_uses_a_token_kept_in_memory(monkeypatch, tmp_path):
    """Ray's job API runs shell commands: a private local cluster gets token auth, never on disk."""
    import ray

    from posttrain.orchestration import cluster

    seen: dict[str, str | None] = {}

    def fake_init(**kwargs):
        seen.update(mode=os.environ.get("RAY_AUTH_MODE"), token=os.environ.get("RAY_AUTH_TOKEN"),
                    address=kwargs.get("address"), host=kwargs.get("dashboard_host"))
        return None

    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", fake_init)
    monkeypatch.setattr(cluster, "_refresh_ray_config", lambda: None)
    cluster.init_ray(temp_dir=str(tmp_path))
    assert seen["address"] == "local" and seen["host"] == "127.0.0.1"
    assert seen["mode"] == "token" and seen["token"] and len(seen["token"]) >= 32
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    cluster.shutdown_ray()  # gives the environment back as it was
    assert "RAY_AUTH_TOKEN" not in os.environ and "RAY_AUTH_MODE" not in os.environ


def test_explicit_ray_auth_mode_is_respected(monkeypatch, tmp_path):
    import ray

    from posttrain.orchestration import cluster

    seen: dict[str, str | None] = {}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(mode=os.environ.get("RAY_AUTH_MODE")))
    cluster.init_ray(temp_dir=str(tmp_path))
    assert seen["mode"] == "disabled"
