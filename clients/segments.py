"""Scatter/gather blocks: one pool block held as a list of memory segments.

A serving engine's paged cache rarely keeps a block contiguous: vLLM holds one tensor per
layer (K and V), so a block is ``2 x layers`` segments. ``Segments`` names such a block;
a put gathers its segments into one contiguous arena block and a get scatters the arena
block back, each in a single NIXL transfer whose descriptor list has one row per segment.
The checksum streams over the segments in order, so it equals the checksum of the
contiguous payload and a block written one way reads back the other.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import xxhash

from kvpool.codec import BlockHeader, DType, make_header
from kvpool.errors import BadRequest
from clients.buffers import BufferView, describe, view

Row = tuple[int, int, int]  # address, length, device id
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Segments:
    """A block given as buffers (numpy arrays or torch tensors, each contiguous) whose
    concatenation, in order, is the block's payload; or, for host memory the caller has
    registered, as ``(address, nbytes)`` pairs, which costs no object per segment (a paged
    cache's blocks are thousands of segments a second). ``owner`` keeps such memory alive.

    The cheapest form is ``parts`` as a numpy array of shape (n, 2), one (address, nbytes)
    row per segment, of host memory the caller registered with ``client.register``: no
    Python object per segment and no registration lookup (memory that is not registered
    makes the transfer fail, a TransferFailed)."""

    parts: Sequence[Any] | np.ndarray
    owner: Any = None

    def __post_init__(self) -> None:
        if isinstance(self.parts, np.ndarray):
            if self.parts.ndim != 2 or self.parts.shape[1] != 2 or not len(self.parts):
                raise BadRequest(f"a segment table has shape (n >= 1, 2), not {self.parts.shape}")
        elif not self.parts:
            raise BadRequest("a segmented block needs at least one segment")


@dataclass(slots=True)
class SegmentedView:
    """What the client needs of a segmented block: its parts as NIXL sees them."""

    parts: list[BufferView]  # empty for a table
    nbytes: int
    mem_type: str
    device: int
    table: np.ndarray | None = None  # (n, 2) int64 address, nbytes: registered host memory

    def checksum(self, limit: int | None = None) -> int:
        """xxh3-64 of the first ``limit`` bytes (all by default), streamed part by part."""
        limit = self.nbytes if limit is None else limit
        if self.table is not None:
            return table_checksum(self.table, limit)
        return stream_checksum(self.parts, limit)


def segmented_view(block: Segments, writable: bool) -> SegmentedView:
    if isinstance(block.parts, np.ndarray):
        table = block.parts.astype(np.int64, copy=False)
        return SegmentedView([], int(table[:, 1].sum()), "DRAM", 0, table)
    if isinstance(block.parts[0], tuple):  # raw host rows
        parts = [BufferView(int(a), int(n), "DRAM", 0, block.owner) for a, n in block.parts]
        return SegmentedView(parts, sum(p.nbytes for p in parts), "DRAM", 0)
    parts = [view(p, writable) for p in block.parts]
    kinds = {(p.mem_type, p.device) for p in parts}
    if len(kinds) != 1:
        raise BadRequest(f"a block's segments must share one memory type and device, got {sorted(kinds)}")
    mem_type, device = kinds.pop()
    return SegmentedView(parts, sum(p.nbytes for p in parts), mem_type, device)


class _NativeXXH3:
    """xxh3-64 streamed through the system's libxxhash with ctypes, which releases the GIL
    for each segment: while one thread verifies landed blocks, the thread posting the next
    NIXL copy is not stalled waiting for the GIL (the xxhash module holds it). The digest is
    the same function; a missing or mismatching library leaves the xxhash module in use."""

    def __init__(self) -> None:
        path = ctypes.util.find_library("xxhash") or "libxxhash.so.0"
        lib = ctypes.CDLL(path)
        lib.XXH3_createState.restype = ctypes.c_void_p
        lib.XXH3_freeState.argtypes = [ctypes.c_void_p]
        lib.XXH3_64bits_reset.argtypes = [ctypes.c_void_p]
        lib.XXH3_64bits_update.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        lib.XXH3_64bits_digest.argtypes = [ctypes.c_void_p]
        lib.XXH3_64bits_digest.restype = ctypes.c_uint64
        self.lib = lib
        probe = np.arange(100_003, dtype=np.uint32).view(np.uint8)
        rows = np.array([[probe.ctypes.data, 1000], [probe.ctypes.data + 1000, probe.nbytes - 1000]],
                        np.uint64)
        if self.digest(rows, probe.nbytes) != xxhash.xxh3_64_intdigest(probe):
            raise OSError(f"{path} computes another xxh3-64")

    def digest(self, table: np.ndarray, limit: int) -> int:
        lib = self.lib
        state = lib.XXH3_createState()
        if not state:
            raise MemoryError("XXH3_createState")
        try:
            lib.XXH3_64bits_reset(state)
            left = limit
            for addr, n in table.tolist():
                if left <= 0:
                    break
                lib.XXH3_64bits_update(state, addr, min(n, left))
                left -= n
            return int(lib.XXH3_64bits_digest(state))
        finally:
            lib.XXH3_freeState(state)


try:
    _NATIVE: _NativeXXH3 | None = _NativeXXH3()
except (OSError, AttributeError) as exc:
    log.info("libxxhash unavailable (%s): checksums of segment tables hold the GIL", exc)
    _NATIVE = None


def table_checksum(table: np.ndarray, limit: int) -> int:
    """xxh3-64 of the first ``limit`` bytes of the host segments in ``table``."""
    if _NATIVE is not None:
        return _NATIVE.digest(table, limit)
    h = xxhash.xxh3_64()
    left = limit
    for addr, n in table.tolist():
        if left <= 0:
            break
        h.update((ctypes.c_char * min(n, left)).from_address(addr))
        left -= n
    return h.intdigest()


def stream_checksum(parts: Sequence[BufferView], limit: int) -> int:
    h = xxhash.xxh3_64()
    left = limit
    for p in parts:
        if left <= 0:
            break
        n = min(p.nbytes, left)
        if p.mem_type == "DRAM":  # straight from the address: no array object per segment
            h.update((ctypes.c_char * n).from_address(p.address))
        else:
            h.update(p.host_bytes()[:n])
        left -= n
    return h.intdigest()


def rows(v: BufferView | SegmentedView, remote: Row, size: int | None = None
         ) -> tuple[list[Row], list[Row]]:
    """Matching local and remote descriptor rows for moving ``size`` bytes (the whole
    buffer by default) between a caller's buffer and one contiguous remote block."""
    addr, rlen, rdev = remote
    size = min(v.nbytes, rlen) if size is None else size
    if isinstance(v, BufferView):
        return [(v.address, size, v.device)], [(addr, size, rdev)]
    if v.table is not None:
        lengths = v.table[:, 1]
        offsets = np.cumsum(lengths) - lengths
        n = int(np.searchsorted(offsets, size))  # segments that start below size
        cut = np.minimum(lengths[:n], size - offsets[:n]).tolist()
        return (list(zip(v.table[:n, 0].tolist(), cut, [0] * n)),
                list(zip((offsets[:n] + addr).tolist(), cut, [rdev] * n)))
    local: list[Row] = []
    far: list[Row] = []
    off = 0
    for p in v.parts:
        if off >= size:
            break
        n = min(p.nbytes, size - off)
        local.append((p.address, n, p.device))
        far.append((addr + off, n, rdev))
        off += n
    return local, far


def payload_checksum(v: BufferView | SegmentedView, limit: int) -> int:
    """The checksum of a landed or outgoing payload, for either kind of buffer."""
    if isinstance(v, SegmentedView):
        return v.checksum(limit)
    data = v.host_bytes()
    return xxhash.xxh3_64_intdigest(data[:limit] if data.nbytes > limit else data)


def as_array(v: SegmentedView) -> np.ndarray:
    """The payload gathered into one new array (tests and tools; not on the hot path)."""
    if v.table is not None:
        return np.concatenate([np.frombuffer((ctypes.c_char * n).from_address(a), np.uint8)
                               for a, n in v.table.tolist()])
    return np.concatenate([np.frombuffer((ctypes.c_char * p.nbytes).from_address(p.address), np.uint8)
                           if p.mem_type == "DRAM" else p.host_bytes() for p in v.parts])


def view_of(obj: Any, writable: bool) -> BufferView | SegmentedView:
    """A caller's buffer as the client moves it: one contiguous buffer, or segments."""
    return segmented_view(obj, writable) if isinstance(obj, Segments) else view(obj, writable)


def parts_of(v: BufferView | SegmentedView) -> list[BufferView]:
    """The buffers the client must make sure NIXL knows (a table's memory is registered)."""
    return v.parts if isinstance(v, SegmentedView) else [v]


def header_of(value: Any, v: BufferView | SegmentedView, layout: str,
              parent: bytes | None = None) -> BlockHeader:
    """The header a put commits: a segmented block is stored as its bytes, in order."""
    if isinstance(v, SegmentedView):
        return BlockHeader(DType.UINT8, (v.nbytes,), layout, v.nbytes, v.checksum(), parent=parent)
    dtype, shape = describe(value)
    return make_header(v.host_bytes(), dtype, shape, layout, parent)
