"""A seccomp filter for sandboxed programs, compiled by libseccomp (through ctypes) into BPF.

bubblewrap loads it with ``--seccomp FD`` right before it execs our runner, so the candidate
and everything it starts are filtered. Denied calls fail with EPERM (a clean ``OSError``, not
a killed process): debugging and memory access of other processes (``ptrace``,
``process_vm_*``, ``pidfd_getfd``), kernel attack surface an honest program never needs
(``io_uring``, ``userfaultfd``, ``bpf``, ``perf_event_open``, the keyring), namespaces and
mounts, modules, kexec, and SysV shared memory / message queues (unbounded by rlimits and
outside every tmpfs size; POSIX shm lives in the sized ``/dev/shm``). ``clone`` is refused
only with a namespace flag; ``clone3`` answers ENOSYS, so glibc falls back to ``clone`` (its
flags sit in memory a filter cannot read). Syscalls of other ABIs (x32, i386 via ``int 0x80``)
kill the caller: libseccomp's default for architectures not in the filter.

Compiled once per process (~1 ms) and cached; :func:`filter_bytes` raises
:class:`SeccompUnavailable` when libseccomp is not installed (apt-get install libseccomp2).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import os

# Denied with EPERM. Names this kernel/libseccomp does not know are skipped (counted only if known).
DENIED: tuple[str, ...] = (
    # reaching into other processes (bwrap's pid 1 runs unfiltered beside the candidate)
    "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "pidfd_getfd", "kcmp",
    # kernel attack surface no test needs
    "io_uring_setup", "io_uring_enter", "io_uring_register", "userfaultfd", "bpf", "perf_event_open",
    "keyctl", "add_key", "request_key", "lookup_dcookie", "fanotify_init", "open_by_handle_at",
    "name_to_handle_at",
    # namespaces and mounts
    "unshare", "setns", "mount", "umount2", "pivot_root", "chroot", "fsopen", "fsconfig", "fsmount",
    "fspick", "move_mount", "open_tree", "open_tree_attr", "mount_setattr",
    # the machine itself
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "reboot",
    "swapon", "swapoff", "acct", "quotactl", "quotactl_fd", "syslog", "iopl", "ioperm",
    "settimeofday", "clock_settime", "clock_adjtime", "adjtimex", "vhangup", "uselib",
    # storage outside every size cap (SysV segments live as long as the IPC namespace)
    "shmget", "msgget",
)
# clone(flags, ...) with any of these in flags is refused: CLONE_NEWNS, NEWCGROUP, NEWUTS,
# NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME.
CLONE_NAMESPACE_FLAGS = (0x00020000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000,
                         0x40000000, 0x00000080)

_ACT_ALLOW = 0x7FFF0000
_SCMP_CMP_MASKED_EQ = 7
_NR_SCMP_ERROR = -1


def _act_errno(code: int) -> int:
    return 0x00050000 | (code & 0xFFFF)


class SeccompUnavailable(RuntimeError):
    """libseccomp could not be loaded or refused to build the filter."""


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int), ("datum_a", ctypes.c_uint64),
                ("datum_b", ctypes.c_uint64)]


@functools.cache
def _library() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise SeccompUnavailable(f"libseccomp not found ({exc}): apt-get install libseccomp2") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint,
                                           ctypes.POINTER(_ArgCmp)]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


@functools.cache
def filter_bytes() -> bytes:
    """The compiled BPF program (``struct sock_filter[]``) for ``bwrap --seccomp FD``."""
    lib = _library()
    ctx = lib.seccomp_init(_ACT_ALLOW)
    if not ctx:
        raise SeccompUnavailable("seccomp_init failed")
    try:
        for name in DENIED:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr != _NR_SCMP_ERROR:
                _add(lib, ctx, _act_errno(errno.EPERM), nr)
        clone = lib.seccomp_syscall_resolve_name(b"clone")
        for flag in CLONE_NAMESPACE_FLAGS:
            _add(lib, ctx, _act_errno(errno.EPERM), clone, _ArgCmp(0, _SCMP_CMP_MASKED_EQ, flag, flag))
        clone3 = lib.seccomp_syscall_resolve_name(b"clone3")
        if clone3 != _NR_SCMP_ERROR:
            _add(lib, ctx, _act_errno(errno.ENOSYS), clone3)
        fd = os.memfd_create("posttrain-seccomp")
        try:
            if (rc := lib.seccomp_export_bpf(ctx, fd)) != 0:
                raise SeccompUnavailable(f"seccomp_export_bpf failed: {os.strerror(-rc)}")
            size = os.lseek(fd, 0, os.SEEK_CUR)
            return os.pread(fd, size, 0)
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)


def _add(lib: ctypes.CDLL, ctx: int, action: int, nr: int, *conditions: _ArgCmp) -> None:
    array = (_ArgCmp * max(1, len(conditions)))(*conditions)
    if (rc := lib.seccomp_rule_add_array(ctx, action, nr, len(conditions), array)) != 0:
        raise SeccompUnavailable(f"seccomp_rule_add for syscall {nr} failed: {os.strerror(-rc)}")


@functools.cache
def denied_names() -> tuple[str, ...]:
    """The syscalls this machine's filter denies (those libseccomp knows), for describe()."""
    lib = _library()
    return tuple(n for n in DENIED if lib.seccomp_syscall_resolve_name(n.encode()) != _NR_SCMP_ERROR)


def available() -> bool:
    try:
        filter_bytes()
    except SeccompUnavailable:
        return False
    return True


def filter_pipe() -> int:
    """A pipe's read end holding the filter (bwrap reads it to EOF); the caller passes and closes it."""
    data = filter_bytes()
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, data)  # a few hundred bytes: far below the pipe buffer, never blocks
    finally:
        os.close(write_fd)
    return read_fd
