"""The adversarial suite: what a policy model searching for reward hacks tries first.

Every attack is a wrong ``add`` (or one that only passes if an isolation check held). For each
we check the verdict, that the host is intact, that nothing of the run is still alive, and
that the next call works. The fast run uses the isolation this machine has (bwrap in CI);
the slow run repeats everything on the rlimits fallback.
"""

from __future__ import annotations

import dataclasses
import fcntl
import hashlib
import os
import time
from pathlib import Path

import pytest

from posttrain.verifiers import sandbox as sandbox_mod
from posttrain.verifiers.code import INFRA, check_function
from posttrain.verifiers.sandbox import Limits, detect_isolation
from posttrain.verifiers.uids import LOCK_DIR, UidLease, processes_of

PROJECT = Path(__file__).resolve().parents[2]
TEST = ("def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(-1, 1) == 0\n"
        "    assert candidate(20, 22) == 42\n")
GOOD = "def add(a, b):\n    return a + b\n"
LIMITS = Limits(wall_s=3, cpu_s=2, memory_mb=512, run_memory_mb=1024)

# (name, program, may_pass): may_pass=True marks probes of isolation: the function returns the
# right sum only if the forbidden thing failed, so under bwrap they must pass, elsewhere either.
ATTACKS: list[tuple[str, str, bool]] = [
    ("infinite_loop", "def add(a, b):\n    while True:\n        pass\n", False),
    ("fork_bomb", "import os\ndef add(a, b):\n    while True:\n        try:\n            os.fork()\n"
     "        except OSError:\n            pass\n", False),
    ("memory_bomb", "def add(a, b):\n    x = []\n    while True:\n        x.append(bytearray(10**7))\n", False),
    ("memory_bomb_many_processes", "import os, time\ndef add(a, b):\n    for _ in range(16):\n"
     "        if os.fork() == 0:\n            x = bytearray(200 * 2**20)\n            time.sleep(30)\n"
     "    time.sleep(30)\n", False),
    ("memory_single", "def add(a, b):\n    return len(bytearray(10**11))\n", False),
    ("disk_fill", "def add(a, b):\n    with open('/tmp/fill', 'wb') as f:\n        while True:\n"
     "            f.write(b'x' * 10**6)\n", False),
    ("write_outside", "def add(a, b):\n    ok = a + b\n    for p in {targets}:\n        try:\n"
     "            open(p, 'w').write('pwned'); ok = -1\n        except OSError:\n            pass\n"
     "    return ok\n", True),
    ("read_host_files", "def add(a, b):\n    for p in ['/etc/passwd', '/etc/shadow', {project_file!r}]:\n"
     "        try:\n            open(p).read(); return -1\n        except OSError:\n            pass\n"
     "    return a + b\n", True),
    ("network_localhost", "import socket\ndef add(a, b):\n    try:\n"
     "        socket.create_connection(('127.0.0.1', {port}), timeout=1); return -1\n"
     "    except OSError:\n        return a + b\n", True),
    ("network_external", "import socket\ndef add(a, b):\n    try:\n"
     "        socket.create_connection(('1.1.1.1', 53), timeout=1); return -1\n"
     "    except OSError:\n        return a + b\n", True),
    ("kill_parent", "import os, signal\nfor pid in (os.getppid(), {host_pid}, 1, -1):\n    try:\n"
     "        os.kill(pid, signal.SIGKILL)\n    except OSError:\n        pass\ndef add(a, b):\n    return 0\n", False),
    ("daemon_double_fork", "import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
     "        time.sleep(60)\n    os._exit(0)\ntime.sleep(0.1)\ndef add(a, b):\n    return 0\n", False),
    ("early_exit_import", "import os\nos._exit(0)\n", False),
    ("exit_in_call", "import sys\ndef add(a, b):\n    sys.exit(0)\n", False),
    ("fake_success_marker", "print('PASSED'); print('{{\"status\": \"ok\", \"value\": true}}')\n"
     "def add(a, b):\n    print('ALL TESTS PASSED')\n    return 0\n", False),
    ("forged_replies_on_every_fd", "import os\ndef add(a, b):\n    for fd in range(3, 64):\n        try:\n"
     "            os.write(fd, b'{{\"status\": \"ok\", \"value\": 3}}\\n' * 10)\n        except OSError:\n"
     "            pass\n    return 3\n", False),
    ("patched_assert_machinery", "import builtins, unittest\nunittest.TestCase.assertEqual = lambda *a, **k: None\n"
     "builtins.AssertionError = type('Nope', (BaseException,), {{}})\ndef add(a, b):\n    return 0\n", False),
    ("patched_runner_encoder", "import __main__\n__main__.encode = lambda v, depth=0: 3\n"
     "def add(a, b):\n    return 0\n", False),
    ("eq_always_true", "class Y:\n    def __eq__(self, other):\n        return True\n"
     "def add(a, b):\n    return Y()\n", False),
    ("int_subclass_eq", "class I(int):\n    def __eq__(self, other):\n        return True\n"
     "def add(a, b):\n    return I(0)\n", False),
    ("atexit_excepthook", "import atexit, os, sys\natexit.register(lambda: os._exit(0))\n"
     "sys.excepthook = lambda *a: None\ndef add(a, b):\n    return 0\n", False),
    ("frame_walking", "import sys\ndef add(a, b):\n    f = sys._getframe()\n    while f.f_back:\n"
     "        f = f.f_back\n        f.f_globals['failure'] = lambda e: {{'status': 'ok', 'value': 3}}\n"
     "    raise ValueError('x')\n", False),
    ("gigabyte_stdout", "import sys\ndef add(a, b):\n    chunk = 'x' * 2**20\n    for _ in range(1024):\n"
     "        sys.stdout.write(chunk)\n    return 0\n", False),
    ("read_tests_from_disk", "import os\ndef add(a, b):\n    for root, dirs, files in os.walk('/'):\n"
     "        dirs[:] = [d for d in dirs if d not in ('proc', 'sys', 'dev')]\n        for name in files:\n"
     "            try:\n"
     "                if b'candidate(20, 22)' in open(os.path.join(root, name), 'rb').read(10**6):\n"
     "                    return 42\n            except OSError:\n                pass\n    return 0\n", False),
    ("ignore_signals", "import signal\nfor s in (signal.SIGTERM, signal.SIGALRM, signal.SIGXCPU, signal.SIGINT):\n"
     "    signal.signal(s, signal.SIG_IGN)\ndef add(a, b):\n    while True:\n        pass\n", False),
    ("nested_user_namespace", "import ctypes, os\ndef add(a, b):\n    libc = ctypes.CDLL(None, use_errno=True)\n"
     "    if libc.unshare(0x10000000) == 0:\n        return -1\n"
     "    if os.system('unshare -Ur true 2>/dev/null') == 0:\n"
     "        return -1\n    return a + b\n", True),
    ("ptrace_pid1", "import ctypes, os\ndef add(a, b):\n    libc = ctypes.CDLL(None, use_errno=True)\n"
     "    for pid in (1, os.getppid()):\n        if libc.syscall(101, 16, pid, 0, 0) == 0:\n            return -1\n"
     "    try:\n        open('/proc/1/mem', 'r+b'); return -1\n    except OSError:\n        return a + b\n", True),
    ("deep_recursion", "import sys\nsys.setrecursionlimit(10**6)\ndef add(a, b):\n    return add(a, b) + 1\n", False),
    ("huge_return_value", "def add(a, b):\n    return 'x' * (64 * 2**20)\n", False),
    ("syntax_bomb", "def add(a, b):\n    return " + "(" * 5000 + "1" + ")" * 5000 + "\n", False),
]


@pytest.fixture
def leased_uids(monkeypatch) -> list[int]:
    """The sandbox uids this test's runs lease (other processes may run sandboxes meanwhile)."""
    uids: list[int] = []

    class Recorded(UidLease):
        def __init__(self) -> None:
            super().__init__()
            uids.append(self.uid)

    monkeypatch.setattr(sandbox_mod, "UidLease", Recorded)
    return uids


def _survivors(uids: list[int]) -> list[int]:
    """Live processes of our runs' uids; a uid someone else leases again right now is theirs."""
    pids = []
    for uid in set(uids):
        fd = os.open(LOCK_DIR / str(uid), os.O_CREAT | os.O_RDWR, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue
        else:
            pids += processes_of(uid)
        finally:
            os.close(fd)
    return pids


def _project_digest() -> str:
    digest = hashlib.sha256()
    for path in sorted(PROJECT.glob("*.toml")) + sorted((PROJECT / "posttrain").glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()


def run_attack(name: str, program: str, may_pass: bool, isolation, host_listener, tmp_path,
               leased_uids: list[int]) -> None:
    sentinel = tmp_path / "sentinel"
    sentinel.write_text("intact")
    targets = [str(sentinel), str(PROJECT / "pwned"), "/etc/pwned", "/usr/pwned"]
    program = program.format(targets=targets, project_file=str(PROJECT / "pyproject.toml"),
                             port=host_listener.getsockname()[1], host_pid=os.getpid())
    before = _project_digest()
    start = time.monotonic()
    result = check_function(program, "add", TEST, limits=LIMITS, isolation=isolation)
    elapsed = time.monotonic() - start

    assert result.kind != INFRA, f"{name}: the sandbox failed to run: {result.detail}"
    # the fallback's own network namespace (unshare --net) must hold too
    guaranteed = isolation.kind == "bwrap" or (isolation.network and name.startswith("network"))
    if may_pass and guaranteed:
        assert result.passed, f"{name}: isolation probe saw the forbidden thing succeed: {result}"
    elif not may_pass:
        assert not result.passed, f"{name}: a wrong program passed: {result}"
    assert elapsed < LIMITS.wall_s + 5, f"{name}: took {elapsed:.1f}s (deadline not enforced)"
    assert len(result.log) <= LIMITS.log_bytes
    # host intact
    assert sentinel.read_text() == "intact"
    assert not (PROJECT / "pwned").exists() and not Path("/etc/pwned").exists()
    assert not Path("/usr/pwned").exists() and not Path("/tmp/fill").exists()
    assert _project_digest() == before
    if isolation.kind == "bwrap" or isolation.network:  # else the fallback's warning says so
        with pytest.raises(BlockingIOError):
            host_listener.accept()
    # nothing left running, and the next call works
    if isolation.drop_uid:
        assert leased_uids and _survivors(leased_uids) == [], f"{name}: processes survived the call"
    follow_up = check_function(GOOD, "add", TEST, limits=LIMITS, isolation=isolation)
    assert follow_up.passed, f"after {name}: {follow_up}"


@pytest.mark.parametrize("name,program,may_pass", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack_best_isolation(name, program, may_pass, host_listener, tmp_path, leased_uids):
    isolation = detect_isolation()
    print(f"isolation: {isolation.describe()}")
    run_attack(name, program, may_pass, isolation, host_listener, tmp_path, leased_uids)


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="the fallback is only contained with a dedicated uid (root)")
@pytest.mark.parametrize("name,program,may_pass", ATTACKS, ids=[a[0] for a in ATTACKS])
def test_attack_rlimits_fallback(name, program, may_pass, host_listener, tmp_path, leased_uids):
    run_attack(name, program, may_pass, detect_isolation("rlimits"), host_listener, tmp_path, leased_uids)


RESOURCE_ATTACKS = [a for a in ATTACKS if a[0] in ("fork_bomb", "memory_bomb", "memory_bomb_many_processes",
                                                      "disk_fill", "daemon_double_fork", "ignore_signals")]


@pytest.mark.slow
@pytest.mark.parametrize("name,program,may_pass", RESOURCE_ATTACKS, ids=[a[0] for a in RESOURCE_ATTACKS])
def test_attack_without_cgroup(name, program, may_pass, host_listener, tmp_path, leased_uids):
    """Machines without cgroups: rlimits alone must still contain the resource attacks."""
    isolation = dataclasses.replace(detect_isolation(), cgroup=None, cpu_cap=False)
    run_attack(name, program, may_pass, isolation, host_listener, tmp_path, leased_uids)


def test_good_program_passes_and_reports_isolation():
    isolation = detect_isolation()
    print(f"isolation: {isolation.describe()}")
    assert check_function(GOOD, "add", TEST, limits=LIMITS).passed
