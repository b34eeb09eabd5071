"""The same-host path: a client copies straight to and from a daemon's host arena.

When client and daemon run on one host, NIXL's loopback transport moves bytes at about a
third of memory speed and costs a tenth of a millisecond per transfer. A daemon's host
arena is a shared mapping of a memfd (named ``ARENA_NAME``): a client on the same host
opens it through ``/proc/<pid>/fd`` and maps it once, and from then on a copy is a
memcpy (8-12 GB/s here, against 3.5-4 GB/s for the kernel's cross-memory copy and its
page pinning). Nothing is left in /dev/shm: the memory goes with the last process that
maps it. Where the arena cannot be mapped (pinned through torch on a CUDA host, or an
older daemon), the kernel's cross-memory copy (``process_vm_readv`` / ``_writev``) moves
the bytes once, address space to address space. Both are open only to a caller that may
trace the daemon (the same user, or CAP_SYS_PTRACE): the operating system's own check
that the two trust each other, and no more than the cross-memory copy already grants.

A daemon names its NIXL agent with its identity (``identity()``): process id, the
host's boot id and the process's start time. A client that finds the same boot id and a
live process of that id started at that time is on the same host, in the same process
namespace, and takes this path; any other client, or a GPU arena, takes NIXL. The copies
are blocking system calls that ctypes makes with the GIL released, so large ones run on a
thread while the caller verifies what already landed, as with NIXL.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re
from dataclasses import dataclass
from functools import lru_cache

from kvpool.errors import TransferFailed

Row = tuple[int, int, int]  # address, length, device id
ARENA_NAME = "kvpool-host-arena"  # the memfd of a daemon's host arena
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
    forget(pid)  # a new daemon under this pid: not the arena of an old one
    for old in [p for p in _mapped if not _alive(p)]:  # a daemon seen for the first time
        forget(old)  # may replace one that died: its arena is not held here any longer
    return pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's: not a daemon this client may copy with
        return False
    return True


@dataclass(frozen=True, slots=True)
class _Mapped:
    """A daemon's host arena as mapped here."""

    base: int  # its address in the daemon
    size: int
    here: int  # its address in this process
    mm: mmap.mmap  # keeps it mapped

    def holds(self, rows: list[Row]) -> bool:
        end = self.base + self.size
        return all(self.base <= a and a + n <= end for a, n, _ in rows)


_mapped: dict[int, _Mapped | None] = {}  # daemon pid -> its arena here (None: cannot be mapped)


def _map_arena(pid: int) -> _Mapped | None:
    """Find the arena's memfd among the daemon's descriptors and its place in the daemon's
    address space, and map it here."""
    tag = f"/memfd:{ARENA_NAME}"
    fd_dir = f"/proc/{pid}/fd"
    try:
        with open(f"/proc/{pid}/maps") as f:
            spans = [line.split() for line in f if tag in line]
        names = os.listdir(fd_dir)
    except OSError:
        return None
    if not spans:
        return None
    addresses, _, offset = spans[0][:3]  # where a part of it is mapped, and from which offset
    base = int(addresses.split("-")[0], 16) - int(offset, 16)
    for name in names:
        try:
            if not os.readlink(f"{fd_dir}/{name}").startswith(tag):
                continue
            fd = os.open(f"{fd_dir}/{name}", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            size = os.fstat(fd).st_size
            mm = mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0))
        except OSError:
            return None
        finally:
            os.close(fd)
        here = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        return _Mapped(base, size, here, mm)
    return None


def _arena(pid: int) -> _Mapped | None:
    if pid not in _mapped:
        _mapped[pid] = _map_arena(pid)
    return _mapped[pid]


def prepare(pid: int) -> bool:
    """Map the arena of daemon ``pid`` now, ahead of the first copy; False: it cannot be."""
    return _arena(pid) is not None


def mapped(pid: int) -> bool:
    """Has this client mapped the arena of daemon ``pid`` (a first copy with it does)?"""
    return _mapped.get(pid) is not None


def forget(pid: int) -> None:
    """Unmap the arena of daemon ``pid`` (gone, or replaced by another under its pid)."""
    _mapped.pop(pid, None)


def copy(op: str, pid: int, local: list[Row], remote: list[Row]) -> None:
    """READ (remote -> local) or WRITE (local -> remote) matching rows with the daemon
    process ``pid``: memcpy through its mapped arena, or the kernel's cross-memory copy.
    TransferFailed when the daemon is gone or the kernel moved less (an address is not
    mapped). A copy holds its mapping while it runs, so ``forget`` on another thread
    cannot unmap it underneath."""
    if len(local) != len(remote) or any(l[1] != r[1] for l, r in zip(local, remote)):
        raise TransferFailed("local and remote rows must pair up with equal lengths")
    arena = _arena(pid)
    if arena is not None and arena.holds(remote):
        if not _alive(pid):  # a daemon that died: its arena is no one's to write or read now
            forget(pid)
            raise TransferFailed(f"same-host {op} with process {pid}: the daemon is gone")
        move, shift = ctypes.memmove, arena.here - arena.base
        for (la, ln, _), (ra, _, _) in zip(local, remote):  # the GIL is released in each
            if op == "READ":
                move(la, ra + shift, ln)
            else:
                move(ra + shift, la, ln)
        return
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
