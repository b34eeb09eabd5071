"""Offsets inside one daemon arena, allocated by the master (the arena never allocates).

Best fit over free extents, with neighbours coalesced on free, keeps large blocks
placeable under mixed-size churn. Every structure is a sorted list searched with bisect,
so each call is O(log n) searches plus list inserts.
"""

from __future__ import annotations

import bisect

from typing import Sequence

from kvpool.errors import BadRequest


class ArenaAllocator:
    def __init__(self, capacity: int, alignment: int = 4096) -> None:
        if capacity <= 0 or alignment <= 0 or alignment & (alignment - 1):
            raise BadRequest("an arena needs a positive capacity and a power-of-two alignment")
        self.capacity = capacity - capacity % alignment
        self.alignment = alignment
        self._free_starts: list[int] = [0]  # sorted starts of free extents
        self._free_size: dict[int, int] = {0: self.capacity}
        self._by_size: list[tuple[int, int]] = [(self.capacity, 0)]  # sorted (size, start)
        self._allocated: dict[int, int] = {}
        self._sizes: dict[int, int] = {}
        self.used = 0

    def _round(self, size: int) -> int:
        need = -(-size // self.alignment) * self.alignment
        # one int object per extent size, not one per extent (blocks come in few sizes)
        return self._sizes.setdefault(need, need) if len(self._sizes) < 4096 else need

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.used

    @property
    def largest_free(self) -> int:
        return self._by_size[-1][0] if self._by_size else 0

    @property
    def fragmentation(self) -> float:
        """0 when all free space is one extent; near 1 when it is in crumbs."""
        free = self.free_bytes
        return 0.0 if free == 0 else 1.0 - self.largest_free / free

    def _take_free(self, start: int) -> int:
        size = self._free_size.pop(start)
        del self._free_starts[bisect.bisect_left(self._free_starts, start)]
        del self._by_size[bisect.bisect_left(self._by_size, (size, start))]
        return size

    def _add_free(self, start: int, size: int) -> None:
        bisect.insort(self._free_starts, start)
        self._free_size[start] = size
        bisect.insort(self._by_size, (size, start))

    def allocate(self, size: int) -> int | None:
        """Offset of a new extent of ``size`` bytes, or None when no free extent fits."""
        if size <= 0:
            raise BadRequest(f"cannot allocate {size} bytes")
        need = self._round(size)
        i = bisect.bisect_left(self._by_size, (need, -1))
        if i == len(self._by_size):
            return None
        extent, start = self._by_size[i]
        self._take_free(start)
        if extent > need:
            self._add_free(start + need, extent - need)
        self._allocated[start] = need
        self.used += need
        return start

    def reserve_at(self, offset: int, size: int) -> None:
        """Mark an exact extent used (rebuilding the index from a daemon's inventory)."""
        need = self._round(size)
        i = bisect.bisect_right(self._free_starts, offset) - 1
        if size <= 0 or i < 0 or offset % self.alignment:
            raise BadRequest(f"extent [{offset}, {offset + size}) is not free in this arena")
        start = self._free_starts[i]
        extent = self._free_size[start]
        if offset + need > start + extent:
            raise BadRequest(f"extent [{offset}, {offset + size}) is not free in this arena")
        self._take_free(start)
        if offset > start:
            self._add_free(start, offset - start)
        if start + extent > offset + need:
            self._add_free(offset + need, start + extent - offset - need)
        self._allocated[offset] = need
        self.used += need

    def reserve_many(self, extents: Sequence[tuple[int, int]]) -> list[int]:
        """Mark many exact extents (offset, size) used at once (an inventory page): each
        free extent they fall in is taken and its gaps given back once, not once per
        block. Returns the positions in ``extents`` of those not free (overlapping a used
        extent or one listed before them at a lower offset); the others are taken."""
        align, refused = self.alignment, []
        order = sorted(range(len(extents)), key=lambda n: extents[n][0])
        i = 0
        while i < len(order):
            offset, size = extents[order[i]]
            j = bisect.bisect_right(self._free_starts, offset) - 1
            start = self._free_starts[j] if j >= 0 else 0
            end = start + self._free_size[start] if j >= 0 else 0
            if size <= 0 or j < 0 or offset % align or offset + self._round(size) > end:
                refused.append(order[i])
                i += 1
                continue
            self._take_free(start)
            cursor = start  # the free extent is carved from here on
            while i < len(order):
                offset, size = extents[order[i]]
                if offset >= end:
                    break
                need = -(-size // align) * align
                if size <= 0 or offset % align or offset < cursor or offset + need > end:
                    refused.append(order[i])
                else:
                    if offset > cursor:
                        self._add_free(cursor, offset - cursor)
                    self._allocated[offset] = need
                    self.used += need
                    cursor = offset + need
                i += 1
            if end > cursor:
                self._add_free(cursor, end - cursor)
        return refused

    def free(self, offset: int) -> None:
        size = self._allocated.pop(offset, None)
        if size is None:
            raise BadRequest(f"offset {offset} is not allocated")
        self.used -= size
        start, end = offset, offset + size
        i = bisect.bisect_left(self._free_starts, offset)
        if i < len(self._free_starts) and self._free_starts[i] == end:
            end += self._take_free(end)
        if i > 0:
            prev = self._free_starts[i - 1]
            if prev + self._free_size[prev] == start:
                start = prev
                self._take_free(prev)
        self._add_free(start, end - start)

    def check(self) -> None:
        assert self._free_starts == sorted(self._free_size)
        assert sorted((s, o) for o, s in self._free_size.items()) == self._by_size
        prev_end = -1
        for start in self._free_starts:
            assert start > prev_end, f"free extents at {start} overlap or are not coalesced"
            prev_end = start + self._free_size[start]
            assert prev_end <= self.capacity
        assert self.used == sum(self._allocated.values())
        assert self.used + sum(self._free_size.values()) == self.capacity
        spans = sorted([(o, o + s) for o, s in self._allocated.items()]
                       + [(o, o + s) for o, s in self._free_size.items()])
        for (a0, a1), (b0, _) in zip(spans, spans[1:]):
            assert a1 <= b0, f"extents [{a0}, {a1}) and one at {b0} overlap"
