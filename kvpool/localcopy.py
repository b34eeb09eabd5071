"""The same-host path: a client copies straight to and from a daemon's host arena.

When client and daemon run on one host, NIXL's loopback transport moves bytes at about a
third of memory speed and costs a tenth of a millisecond per transfer. The kernel's
cross-memory copy (``process_vm_readv`` / ``process_vm_writev``) moves them once, from one
address space to the other, at memory speed, with no shared mapping to set up, no file
in /dev/shm that outlives a crash, and the arena left as it is (anonymous huge pages).
The kernel allows it only to a caller that may trace the daemon (the same user, or
CAP_SYS_PTRACE): the operating system's own check that the two trust each other.

A daemon names its NIXL agent with its identity (``identity()``): process id, the
host's boot id and the process's start time. A client that finds the same boot id and a
live process of that id started at that time is on the same host, in the same process
namespace, and takes this path; any other client, or a GPU arena, takes NIXL. The copies
are blocking system calls that ctypes makes with the GIL released, so large ones run on a
thread while the caller verifies what already landed, as with NIXL.
"""

from __future__ import annotations

import ctypes
import os
import re
from functools import lru_cache

from kvpool.errors import TransferFailed

Row = tuple[int, int, int]  # address, length, device id
_IOV_MAX = 1024  # iovecs one call takes
_NAME = re.compile(r"-p(\d+)-([0-9a-f]{8})-(\d+)$")


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    for name in ("process_vm_readv", "process_vm_writev"):
        fn = getattr(libc, name)
        fn.restype = ctypes.c_ssize_t
        fn.argtypes = [ctypes.c_int, ctypes.POINTER(_Iovec), ctypes.c_ulong,
                       ctypes.POINTER(_Iovec), ctypes.c_ulong, ctypes.c_ulong]
    return libc


def _boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip().replace("-", "")[:8]
    except OSError:
        return ""


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # field 22: starttime, in clock ticks


def identity() -> str:
    """What a daemon appends to its agent's name so that a client can tell it shares the host."""
    pid = os.getpid()
    return f"-p{pid}-{_boot_id() or '00000000'}-{_start_time(pid) or 0}"


@lru_cache(maxsize=256)
def local_pid(agent: str) -> int | None:
    """The daemon process behind ``agent`` if it runs on this host and this client may copy
    from its memory; None: use NIXL."""
    found = _NAME.search(agent)
    if found is None or not hasattr(_libc(), "process_vm_readv"):
        return None
    pid, boot, started = int(found.group(1)), found.group(2), int(found.group(3))
    if boot != _boot_id() or _start_time(pid) != started:
        return None
    probe = ctypes.c_char()
    local = _Iovec(ctypes.cast(ctypes.byref(probe), ctypes.c_void_p), 0)
    if _libc().process_vm_readv(pid, ctypes.byref(local), 1, ctypes.byref(local), 1, 0) < 0:
        return None  # not permitted (another user, ptrace restrictions): NIXL
    return pid


def copy(op: str, pid: int, local: list[Row], remote: list[Row]) -> None:
    """READ (remote -> local) or WRITE (local -> remote) matching rows with the daemon
    process ``pid``; TransferFailed when the kernel moved less (the daemon died, or an
    address is not mapped)."""
    if len(local) != len(remote) or any(l[1] != r[1] for l, r in zip(local, remote)):
        raise TransferFailed("local and remote rows must pair up with equal lengths")
    fn = _libc().process_vm_readv if op == "READ" else _libc().process_vm_writev
    for start in range(0, len(local), _IOV_MAX):
        lrows, rrows = local[start:start + _IOV_MAX], remote[start:start + _IOV_MAX]
        n = len(lrows)
        liov, riov = (_Iovec * n)(), (_Iovec * n)()
        for k, ((la, ln, _), (ra, _, _)) in enumerate(zip(lrows, rrows)):
            liov[k].iov_base, liov[k].iov_len = la, ln
            riov[k].iov_base, riov[k].iov_len = ra, ln
        want = sum(r[1] for r in lrows)
        moved = fn(pid, liov, n, riov, n, 0)
        if moved != want:  # the kernel stops short only at an address that is not mapped
            err = ctypes.get_errno()
            raise TransferFailed(f"same-host {op} with process {pid} moved {moved} of {want} "
                                 f"bytes ({os.strerror(err) if moved < 0 else 'short copy'}); "
                                 "the daemon is probably gone")
