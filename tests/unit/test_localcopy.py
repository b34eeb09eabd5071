"""The same-host copy and how a client tells that a daemon shares its host."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from kvpool import localcopy
from kvpool.errors import TransferFailed


def test_a_process_is_recognised_by_its_identity_and_nothing_else() -> None:
    me = localcopy.identity()
    assert localcopy.local_pid("kvpool-node0-abcd" + me) == os.getpid()
    pid, boot, started = me.lstrip("-").split("-")
    assert localcopy.local_pid(f"kvpool-node0-abcd-{pid}-ffffffff-{started}") is None  # another host
    assert localcopy.local_pid(f"kvpool-node0-abcd-{pid}-{boot}-{int(started) + 1}") is None  # pid reused
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert localcopy.local_pid(f"kvpool-node0-abcd-p{dead}-{boot}-{started}") is None
    assert localcopy.local_pid("kvpool-node0-abcd") is None  # a daemon that does not say


def test_copies_move_every_row_both_ways() -> None:
    src = np.random.default_rng(1).integers(0, 256, 3 << 20, dtype=np.uint8)
    dst = np.zeros_like(src)
    rows = [(0, 1 << 20), (1 << 20, 4096), (2 << 20, 1 << 20)]
    local = [(dst.ctypes.data + off, n, 0) for off, n in rows]
    remote = [(src.ctypes.data + off, n, 0) for off, n in rows]
    localcopy.copy("READ", os.getpid(), local, remote)
    for off, n in rows:
        assert np.array_equal(dst[off:off + n], src[off:off + n])
    assert not dst[(1 << 20) + 4096:2 << 20].any()  # nothing between the rows
    back = np.zeros_like(src)
    localcopy.copy("WRITE", os.getpid(), [(src.ctypes.data, 4096, 0)], [(back.ctypes.data, 4096, 0)])
    assert np.array_equal(back[:4096], src[:4096])


def test_a_copy_that_cannot_complete_is_a_transfer_failure() -> None:
    dst = np.zeros(4096, np.uint8)
    with pytest.raises(TransferFailed, match="moved -1 of 4096"):
        localcopy.copy("READ", os.getpid(), [(dst.ctypes.data, 4096, 0)], [(4096, 4096, 0)])
    with pytest.raises(TransferFailed, match="pair up"):
        localcopy.copy("READ", os.getpid(), [(dst.ctypes.data, 4096, 0)], [(dst.ctypes.data, 8, 0)])


ARENA_HOLDER = """
import os, sys
import numpy as np
from kvpool.tiers.arena import ArenaTier
arena = ArenaTier.host(1 << 20)
view = np.frombuffer(arena._mm, np.uint8)
view[:] = np.arange(1 << 20, dtype=np.uint64).astype(np.uint8)
print(os.getpid(), arena.address, flush=True)
sys.stdin.readline()  # the test has written its rows: say what the arena holds there
print(int(view[4096:8192].sum()), flush=True)
sys.stdin.readline()
"""


def test_a_daemons_host_arena_is_mapped_once_and_copied_with_memcpy_both_ways() -> None:
    """The arena's memfd, found under /proc/<pid>, mapped here: reads and writes land in the
    daemon's own memory; once the daemon is gone a copy fails, typed, and the mapping goes."""
    holder = subprocess.Popen([sys.executable, "-c", ARENA_HOLDER], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        pid, address = map(int, holder.stdout.readline().split())  # type: ignore[union-attr]
        assert not localcopy.mapped(pid)
        want = np.arange(1 << 20, dtype=np.uint64).astype(np.uint8)
        dst = np.zeros(8192, np.uint8)
        localcopy.copy("READ", pid, [(dst.ctypes.data, 8192, 0)], [(address + 65536, 8192, 0)])
        assert np.array_equal(dst, want[65536:65536 + 8192])
        assert localcopy.mapped(pid)  # the first copy mapped it
        src = np.full(4096, 3, np.uint8)
        localcopy.copy("WRITE", pid, [(src.ctypes.data, 4096, 0)], [(address + 4096, 4096, 0)])
        holder.stdin.write("\n")  # type: ignore[union-attr]
        holder.stdin.flush()  # type: ignore[union-attr]
        assert int(holder.stdout.readline()) == 3 * 4096  # type: ignore[union-attr]
    finally:
        holder.kill()
        holder.wait()
    with pytest.raises(TransferFailed, match="gone"):
        localcopy.copy("READ", pid, [(dst.ctypes.data, 8192, 0)], [(address, 8192, 0)])
    assert not localcopy.mapped(pid)  # unmapped: its memory is not held here any more
