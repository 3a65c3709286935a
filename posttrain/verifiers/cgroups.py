"""One cgroup per sandbox uid: a *total* memory and process cap for everything a run starts.

rlimits are per process (RLIMIT_AS) or per uid (RLIMIT_NPROC), so 32 processes of 1 GiB each
would still fit under them; a cgroup caps the sum, tmpfs pages included. We create child
cgroups under our own (so a container's limits still hold above them), v1 (``memory`` and
``pids`` hierarchies) or v2 (unified, if our cgroup delegates both controllers). The run joins
its cgroup through a tiny ``sh`` wrapper that writes its own pid before exec'ing the
sandbox, so no child can be forked outside it. Needs root; otherwise ``mode()`` is None.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")


def _own_paths() -> dict[str, str]:
    """controller -> our cgroup path, from /proc/self/cgroup ("" key: the v2 unified path)."""
    paths = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(",") if controllers else [""]:
            paths[controller] = path
    return paths


def _dirs(mode: str, name: str) -> list[Path]:
    own = _own_paths()
    if mode == "v1":
        return [ROOT / c / own.get(c, "/").lstrip("/") / name for c in ("memory", "pids")]
    return [ROOT / own.get("", "/").lstrip("/") / name]


@functools.cache
def mode() -> str | None:
    """"v1", "v2" or None: which kind of per-run cgroup we can create here."""
    if os.geteuid() != 0:
        return None
    for candidate in ("v1", "v2"):
        try:
            cgroup = RunCgroup(f"posttrain-probe-{os.getpid()}", 64 << 20, 8, candidate)
            cgroup.remove()
            return candidate
        except (OSError, ValueError):
            continue
    return None


class RunCgroup:
    """A named cgroup with ``memory_bytes`` and ``pids`` caps; ``wrapper()`` puts a command in it."""

    def __init__(self, name: str, memory_bytes: int, pids: int, kind: str | None = None) -> None:
        self.kind = kind or mode()
        if self.kind not in ("v1", "v2"):
            raise ValueError(f"no usable cgroup hierarchy here (got {self.kind!r}); run as root with cgroups")
        self.dirs = _dirs(self.kind, name)
        for folder in self.dirs:
            folder.mkdir(exist_ok=True)
        if self.kind == "v1":
            memory, pids_dir = self.dirs
            (memory / "memory.limit_in_bytes").write_text(str(memory_bytes))
            (memory / "memory.failcnt").write_text("0")
            (pids_dir / "pids.max").write_text(str(pids))
        else:
            (self.dirs[0] / "memory.max").write_text(str(memory_bytes))
            (self.dirs[0] / "memory.swap.max").write_text("0")
            (self.dirs[0] / "pids.max").write_text(str(pids))
        self._ooms = self._oom_count()

    def _oom_count(self) -> int:
        if self.kind == "v1":
            return int((self.dirs[0] / "memory.failcnt").read_text())
        for line in (self.dirs[0] / "memory.events").read_text().splitlines():
            if line.startswith("oom_kill "):
                return int(line.split()[1])
        return 0

    def hit_memory_limit(self) -> bool:
        """Did the run touch its memory cap (the kernel reclaimed or OOM-killed inside it)?"""
        return self._oom_count() > self._ooms

    def wrapper(self) -> list[str]:
        """argv prefix: join every hierarchy of this cgroup, then exec the rest (exit 125 if not)."""
        script = 'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'
        return ["/bin/sh", "-c", script, "sh", *[str(d / "cgroup.procs") for d in self.dirs], "--"]

    def remove(self) -> None:
        """Delete the cgroup folders (only possible once no process is left in them)."""
        for folder in self.dirs:
            try:
                folder.rmdir()
            except OSError:
                pass
