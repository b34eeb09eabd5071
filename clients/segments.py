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
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import xxhash

from kvpool.codec import BlockHeader, DType, make_header
from kvpool.errors import BadRequest
from clients.buffers import BufferView, describe, view

Row = tuple[int, int, int]  # address, length, device id


@dataclass(frozen=True, slots=True)
class Segments:
    """A block given as buffers (numpy arrays or torch tensors, each contiguous) whose
    concatenation, in order, is the block's payload; or, for host memory the caller has
    registered, as ``(address, nbytes)`` pairs, which costs no object per segment (a paged
    cache's blocks are thousands of segments a second). ``owner`` keeps such memory alive."""

    parts: Sequence[Any]
    owner: Any = None

    def __post_init__(self) -> None:
        if not self.parts:
            raise BadRequest("a segmented block needs at least one segment")


@dataclass(slots=True)
class SegmentedView:
    """What the client needs of a segmented block: its parts as NIXL sees them."""

    parts: list[BufferView]
    nbytes: int
    mem_type: str
    device: int

    def checksum(self, limit: int | None = None) -> int:
        """xxh3-64 of the first ``limit`` bytes (all by default), streamed part by part."""
        return stream_checksum(self.parts, self.nbytes if limit is None else limit)


def segmented_view(block: Segments, writable: bool) -> SegmentedView:
    if isinstance(block.parts[0], tuple):  # raw host rows
        parts = [BufferView(int(a), int(n), "DRAM", 0, block.owner) for a, n in block.parts]
        return SegmentedView(parts, sum(p.nbytes for p in parts), "DRAM", 0)
    parts = [view(p, writable) for p in block.parts]
    kinds = {(p.mem_type, p.device) for p in parts}
    if len(kinds) != 1:
        raise BadRequest(f"a block's segments must share one memory type and device, got {sorted(kinds)}")
    mem_type, device = kinds.pop()
    return SegmentedView(parts, sum(p.nbytes for p in parts), mem_type, device)


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
    return np.concatenate([np.frombuffer((ctypes.c_char * p.nbytes).from_address(p.address), np.uint8)
                           if p.mem_type == "DRAM" else p.host_bytes() for p in v.parts])


def view_of(obj: Any, writable: bool) -> BufferView | SegmentedView:
    """A caller's buffer as the client moves it: one contiguous buffer, or segments."""
    return segmented_view(obj, writable) if isinstance(obj, Segments) else view(obj, writable)


def parts_of(v: BufferView | SegmentedView) -> list[BufferView]:
    return v.parts if isinstance(v, SegmentedView) else [v]


def header_of(value: Any, v: BufferView | SegmentedView, layout: str,
              parent: bytes | None = None) -> BlockHeader:
    """The header a put commits: a segmented block is stored as its bytes, in order."""
    if isinstance(v, SegmentedView):
        return BlockHeader(DType.UINT8, (v.nbytes,), layout, v.nbytes, v.checksum(), parent=parent)
    dtype, shape = describe(value)
    return make_header(v.host_bytes(), dtype, shape, layout, parent)
