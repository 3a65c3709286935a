"""Dedicated sandbox uids: an exclusive lease per run, and killing everything a uid left behind.

uids rotate through a pool (one flock per uid, so parallel workers and processes never share
one): a fork bomb's zombies from one run cannot eat the next run's process cap, and after
every run each process of that uid is SIGKILLed, so nothing outlives a call.
"""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import signal
import time
from pathlib import Path
from typing import Any

UID_BASE = int(os.environ.get("POSTTRAIN_SANDBOX_UID_BASE", "61000"))
UID_COUNT = 64
LOCK_DIR = Path(os.environ.get("POSTTRAIN_SANDBOX_LOCKS", "/tmp/posttrain-sandbox-uids"))


class UidError(RuntimeError):
    """A uid could not be leased or cleaned (the sandbox reports it as an infrastructure error)."""


class UidLease:
    """Exclusive use of one uid from the pool, held by an flock for the run's duration."""

    def __init__(self) -> None:
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        order = list(range(UID_COUNT))
        random.shuffle(order)
        for attempt in (fcntl.LOCK_EX | fcntl.LOCK_NB, fcntl.LOCK_EX):
            for i in order:
                fd = os.open(LOCK_DIR / str(UID_BASE + i), os.O_CREAT | os.O_RDWR, 0o600)
                try:
                    fcntl.flock(fd, attempt)
                except BlockingIOError:
                    os.close(fd)
                    continue
                self.uid, self._fd = UID_BASE + i, fd
                kill_uid(self.uid)  # leftovers of a crashed owner
                return
        raise UidError("no sandbox uid could be locked")  # unreachable: the blocking pass waits

    def release(self) -> None:
        """Give the uid back (the caller has swept it; the next holder sweeps again on entry)."""
        os.close(self._fd)


def kill_uid(uid: int, patience_s: float = 10.0) -> int:
    """SIGKILL every process owned by ``uid`` until none is left; returns how many were seen.

    Patient: a process killed while its cgroup is at the memory cap can take seconds to exit.
    """
    seen, deadline, pause = 0, time.monotonic() + patience_s, 0.001
    while pids := processes_of(uid):
        if time.monotonic() > deadline:
            raise UidError(f"processes of uid {uid} survive SIGKILL for {patience_s}s: {pids}")
        seen += len(pids)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(pause)
        pause = min(pause * 2, 0.05)
    return seen


def remove_files_of(uid: int, folders: tuple[str, ...] = ("/tmp", "/var/tmp", "/dev/shm")) -> None:
    """Fallback only (no private tmpfs): delete what the run's uid left in world-writable folders."""
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            try:
                if entry.stat(follow_symlinks=False).st_uid != uid:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path, ignore_errors=True)
                else:
                    os.unlink(entry.path)
            except OSError:
                continue


def processes_of(uid: int) -> list[int]:
    """Live (non-zombie) pids whose effective uid is ``uid``."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid and _state(entry.name) != "Z":
                    pids.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError):
                continue
    return pids


def _state(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0].decode()
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return "Z"


def drop_to(uid: int) -> tuple[list[str], dict[str, Any]]:
    """How to start a child as ``uid`` with no groups and no_new_privs (no setuid escalation).

    ``setpriv`` (util-linux) lets Popen use vfork: ~0.4 ms instead of 4-9 ms for forking a big
    parent (a Ray actor) with ``user=``; without setpriv we fall back to Popen's own switch.
    """
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs", "--"], {}
    return [], {"user": uid, "group": uid, "extra_groups": []}
