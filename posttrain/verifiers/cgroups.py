"""Per-run cgroups: a *total* memory, process and CPU cap for everything a run starts.

rlimits are per process (RLIMIT_AS) or per uid (RLIMIT_NPROC), so 32 processes of 1 GiB each
would still fit under them, and 30 spinning processes would take every core from the runs
beside them; a cgroup caps the sum (tmpfs pages included) and the CPU share. We create child
cgroups under our own (so a container's limits still hold above them): v1 (``memory``,
``pids`` and, when mounted, ``cpu`` hierarchies) or v2 (unified, if our cgroup delegates the
controllers). Needs root; otherwise ``mode()`` is None and the sandbox says what is missing.

Each sandbox leases a :class:`Slot`: a cgroup reused run after run (only by this process, one
run at a time; its caps are rewritten only when they change, the OOM counter is read by delta).
Joining a cgroup (writing ``cgroup.procs``) takes the kernel's global threadgroup lock for
writing, which first waits for an RCU grace period once the lock has been idle: 5-15 ms per
run here, most of the sandbox's overhead. So on v1, where threads join cgroups one by one,
each slot parks one thread of ours inside it and forks the run from that thread: the child
is born in the cgroup and nothing migrates. On v2 a tiny ``sh`` wrapper joins first, as before.
"""

from __future__ import annotations

import atexit
import functools
import os
import queue
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path("/sys/fs/cgroup")
CPU_PERIOD_US = 100_000
PREFIX = "posttrain-sandbox-"
T = TypeVar("T")


def _own_paths() -> dict[str, str]:
    """controller -> our cgroup path, from /proc/self/cgroup ("" key: the v2 unified path)."""
    paths = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def _parents(kind: str) -> dict[str, Path]:
    """controller -> the folder our child cgroups go in ("" for v2's single folder)."""
    own = _own_paths()
    if kind == "v1":
        found = {c: ROOT / c / own.get(c, "/").lstrip("/") for c in ("memory", "pids", "cpu")}
        return {c: path for c, path in found.items() if (path / "cgroup.procs").exists() and os.access(path, os.W_OK)}
    return {"": ROOT / own.get("", "/").lstrip("/")}


@functools.cache
def mode() -> str | None:
    """"v1", "v2" or None: which kind of per-run cgroup we can create here."""
    if os.geteuid() != 0:
        return None
    for candidate in ("v1", "v2"):
        try:
            probe = RunCgroup(f"posttrain-probe-{os.getpid()}", candidate)
            probe.set_caps(64 << 20, 8, 0)
            probe.remove()
            return candidate
        except (OSError, ValueError):
            continue
    return None


@functools.cache
def has_cpu_cap(kind: str) -> bool:
    """Can a run's cgroup cap its CPU here (v1 ``cpu`` hierarchy, or v2 ``cpu`` delegated)?"""
    parents = _parents(kind)
    if kind == "v1":
        return "cpu" in parents and (parents["cpu"] / "cpu.cfs_quota_us").exists()
    controllers = parents[""] / "cgroup.subtree_control"
    return controllers.exists() and "cpu" in controllers.read_text().split()


class RunCgroup:
    """A named cgroup (one folder per v1 hierarchy) with memory, process and CPU caps."""

    def __init__(self, name: str, kind: str | None = None) -> None:
        self.kind = kind or mode()
        if self.kind == "v1":
            self.dirs = {c: parent / name for c, parent in _parents("v1").items()}
            if not {"memory", "pids"} <= self.dirs.keys():
                raise ValueError("cgroup v1 without memory and pids hierarchies under /sys/fs/cgroup")
        elif self.kind == "v2":
            if not (ROOT / "cgroup.controllers").exists():  # a v1 host's tmpfs would take any mkdir
                raise ValueError(f"{ROOT} is not a cgroup2 mount")
            self.dirs = {"": _parents("v2")[""] / name}
        else:
            raise ValueError(f"no usable cgroup hierarchy here (got {self.kind!r}); run as root with cgroups")
        for folder in self.dirs.values():
            folder.mkdir(exist_ok=True)
        self._written: dict[Path, str] = {}
        self._ooms = self._oom_count()

    def _write(self, path: Path, value: str) -> None:
        if self._written.get(path) != value:  # unchanged caps are not rewritten run after run
            path.write_text(value)
            self._written[path] = value

    def set_caps(self, memory_bytes: int, pids: int, cpus: float) -> None:
        """Total memory (tmpfs included, no swap), new processes+threads, CPUs (<= 0: no CPU cap).

        ``pids`` counts from what the cgroup holds now: a finished run's bwrap pid 1 stays
        charged for a second or two after it died (until the host's init reaps it), and dead
        tasks cannot fork. The run's uid has its own RLIMIT_NPROC besides.
        """
        quota = int(cpus * CPU_PERIOD_US) if cpus > 0 else -1
        pids_dir = self.dirs["pids" if self.kind == "v1" else ""]
        pids += int((pids_dir / "pids.current").read_text())
        if self.kind == "v1":
            self._write(self.dirs["memory"] / "memory.limit_in_bytes", str(memory_bytes))
            self._write(self.dirs["pids"] / "pids.max", str(pids))
            if "cpu" in self.dirs:
                self._write(self.dirs["cpu"] / "cpu.cfs_period_us", str(CPU_PERIOD_US))
                self._write(self.dirs["cpu"] / "cpu.cfs_quota_us", str(quota))
        else:
            folder = self.dirs[""]
            self._write(folder / "memory.max", str(memory_bytes))
            self._write(folder / "memory.swap.max", "0")
            self._write(folder / "pids.max", str(pids))
            if (folder / "cpu.max").exists():
                self._write(folder / "cpu.max", f"{quota if quota > 0 else 'max'} {CPU_PERIOD_US}")

    def _oom_count(self) -> int:
        if self.kind == "v1":
            return int((self.dirs["memory"] / "memory.failcnt").read_text())
        events = self.dirs[""] / "memory.events"
        for line in events.read_text().splitlines() if events.exists() else ():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def begin_run(self) -> None:
        """Remember the memory-limit counter: a later increase means this run hit the cap."""
        self._ooms = self._oom_count()

    def hit_memory_limit(self) -> bool:
        """Did the run touch its memory cap (the kernel reclaimed or OOM-killed inside it)?"""
        return self._oom_count() > self._ooms

    def wrapper(self) -> list[str]:
        """argv prefix: join every hierarchy of this cgroup, then exec the rest (exit 125 if not)."""
        script = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'
        return ["/bin/sh", "-c", script, "sh", *[str(d / "cgroup.procs") for d in self.dirs.values()], "--"]

    def remove(self) -> None:
        """Delete the cgroup folders (only possible once no process is left in them)."""
        for folder in self.dirs.values():
            try:
                folder.rmdir()
            except OSError:
                pass


class Slot:
    """A cgroup reused by one sandbox at a time; on v1 with a thread of ours parked inside it.

    ``spawn(fn)`` calls ``fn`` (a ``subprocess.Popen``) on that thread, so the child starts in
    the cgroup. (The thread is one task in ``pids.current``; caps count from there.)
    """

    def __init__(self, index: int, kind: str) -> None:
        self.cgroup = RunCgroup(f"{PREFIX}{os.getpid()}-{index}", kind)
        self.kind = kind
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], queue.SimpleQueue[Any]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        if kind == "v1":
            joined: queue.SimpleQueue[Any] = queue.SimpleQueue()
            self._thread = threading.Thread(target=self._serve, args=(joined,), name=f"sandbox-slot-{index}",
                                            daemon=True)
            self._thread.start()
            error = joined.get()
            if error is not None:
                self.cgroup.remove()
                raise error

    def _serve(self, joined: queue.SimpleQueue[Any]) -> None:
        tid = str(threading.get_native_id())
        try:
            for folder in self.cgroup.dirs.values():
                (folder / "tasks").write_text(tid)
        except OSError as exc:
            self._leave(tid)
            joined.put(exc)
            return
        joined.put(None)
        while (job := self._jobs.get()) is not None:
            fn, reply = job
            try:
                reply.put((True, fn()))
            except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
                reply.put((False, exc))
        self._leave(tid)

    def _leave(self, tid: str) -> None:
        """Back to our own cgroups (so the slot's folders can be removed)."""
        for controller, parent in _parents("v1").items():
            if controller in self.cgroup.dirs:
                try:
                    (parent / "tasks").write_text(tid)
                except OSError:
                    pass

    @property
    def in_thread(self) -> bool:
        return self._thread is not None

    def spawn(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the slot's thread (v1), or here (v2: use ``cgroup.wrapper()``)."""
        if self._thread is None:
            return fn()
        reply: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
        self._jobs.put((fn, reply))
        ok, value = reply.get()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join(timeout=5)
            self._thread = None
        self.cgroup.remove()


class _Slots:
    """This process's slots: a free list that grows to the number of concurrent sandboxes."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.all: list[Slot] = []
        self.free: list[Slot] = []

    def lease(self, kind: str) -> Slot:
        with self.lock:
            if self.free:
                return self.free.pop()
            if not self.all:
                _remove_stale(kind)
                atexit.register(self.close_all)
            slot = Slot(len(self.all), kind)
            self.all.append(slot)
            return slot

    def release(self, slot: Slot) -> None:
        with self.lock:
            self.free.append(slot)

    def close_all(self) -> None:
        if self is not _SLOTS:  # a forked child's copy: the threads stayed in the parent
            return
        with self.lock:
            for slot in self.all:
                slot.close()
            self.all, self.free = [], []


_SLOTS = _Slots()
os.register_at_fork(after_in_child=lambda: globals().update(_SLOTS=_Slots()))  # the threads stay in the parent


def lease(kind: str, memory_bytes: int, pids: int, cpus: float) -> Slot:
    """A slot for one run with these caps (``pids``: processes and threads the run may add)."""
    slot = _SLOTS.lease(kind)
    try:
        slot.cgroup.set_caps(memory_bytes, pids, cpus)
        slot.cgroup.begin_run()
    except OSError:
        _SLOTS.release(slot)
        raise
    return slot


def release(slot: Slot) -> None:
    """Give the slot back once every process of its run is gone."""
    _SLOTS.release(slot)


def _remove_stale(kind: str) -> None:
    """Folders left by dead processes (and by the older one-cgroup-per-uid layout)."""
    for parent in _parents(kind).values():
        try:
            names = [e.name for e in os.scandir(parent) if e.is_dir() and e.name.startswith(PREFIX)]
        except OSError:
            continue
        for name in names:
            match = re.fullmatch(rf"{PREFIX}(\d+)-\d+", name)
            if match and Path(f"/proc/{match.group(1)}").exists():
                continue  # a live process's slot
            try:
                (parent / name).rmdir()
            except OSError:
                pass
