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
import logging
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import xxhash

from kvpool.errors import BadRequest
from clients.buffers import BufferView, view

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
        h = StreamHash()
        h.update(self, limit)
        return h.digest()


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


_ARRAYS: dict[int, Any] = {}  # ctypes array types by length: making one per segment is slow


class StreamHash:
    """The xxh3-64 of a payload fed piece by piece, in order: a block written in parts
    (one model layer at a time) is hashed as each part is written, and a segmented block
    segment by segment. Host segments go by address. The xxhash module is used rather
    than the system's libxxhash through ctypes, which would release the GIL while it
    hashes: measured on 64 KiB segments here, the module hashes at about twice the speed
    (13.7 against 7 GB/s), which matters more than the GIL for the few microseconds each
    segment takes."""

    __slots__ = ("_h",)

    def __init__(self) -> None:
        self._h = xxhash.xxh3_64()

    def feed(self, address: int, n: int) -> None:
        """Feed ``n`` bytes of host memory at ``address``."""
        t = _ARRAYS.get(n)
        if t is None:
            t = _ARRAYS[n] = ctypes.c_char * n
        self._h.update(t.from_address(address))

    def update(self, v: "BufferView | SegmentedView", limit: int | None = None) -> None:
        """Feed the first ``limit`` bytes (all by default) of a buffer or segmented block."""
        left = v.nbytes if limit is None else limit
        if isinstance(v, SegmentedView) and v.table is not None:
            for addr, n in v.table.tolist():
                if left <= 0:
                    break
                self.feed(addr, min(n, left))
                left -= n
            return
        for p in v.parts if isinstance(v, SegmentedView) else [v]:
            if left <= 0:
                break
            n = min(p.nbytes, left)
            if p.mem_type == "DRAM":
                self.feed(p.address, n)
            else:  # device memory: through a host copy
                data = np.ascontiguousarray(p.host_bytes()[:n])
                self.feed(data.ctypes.data, n)
            left -= n

    def digest(self) -> int:
        return self._h.intdigest()


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
