"""Arena regions: each tenant with an ``arena_share`` owns a fixed slice of every node's
arenas, and the rest is the common region (the default tenant, shared namespaces, tenants
without a share).

A region is registered with NIXL on its own (kvpool.daemon ``regions``), so the metadata a
tenant's client gets names that slice's memory and no other. The layout is a pure function
of the config and the arena's capacity: tenants with a share in name order from offset 0,
each share rounded down to the alignment, the common region last. A new leader, or a master
restarted with the same config, computes the same layout, and the blocks a daemon reports
fall where they were put.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Mapping, Sequence

from kvpool.errors import BadRequest
from master.allocator import ArenaAllocator

COMMON = ""  # the region of every scope without a share of its own


@dataclass(frozen=True, slots=True)
class Region:
    name: str  # a tenant's name, or COMMON
    offset: int  # from the arena's base
    size: int

    @property
    def end(self) -> int:
        return self.offset + self.size


def layout(capacity: int, alignment: int, shares: Mapping[str, float]) -> list[Region]:
    """The regions of an arena of ``capacity`` bytes; one COMMON region without shares."""
    usable = capacity - capacity % alignment
    out, at = [], 0
    for name in sorted(n for n, share in shares.items() if share > 0):
        size = int(usable * shares[name]) // alignment * alignment
        if size <= 0:
            continue  # an arena too small for this share: the tenant stays in the common one
        out.append(Region(name, at, size))
        at += size
    out.append(Region(COMMON, at, usable - at))
    return out


class RegionAllocator:
    """Offsets inside one arena, each region allocated on its own (master.allocator)."""

    def __init__(self, capacity: int, alignment: int = 4096,
                 regions: list[Region] | None = None) -> None:
        self.regions = regions or layout(capacity, alignment, {})
        if not self.regions or self.regions[-1].name != COMMON:
            raise BadRequest("an arena's regions end with the common one")
        self.capacity = self.regions[-1].end
        self.alignment = alignment
        self._parts = {r.name: (r, ArenaAllocator(r.size, alignment)) for r in self.regions if r.size}
        if COMMON not in self._parts:
            raise BadRequest("the shares leave no common region in this arena")
        self._starts = [r.offset for r in self.regions]
        self._allocators = [a for _, a in self._parts.values()]  # what ``used`` sums: per block

    def region(self, name: str) -> Region:
        """The region a scope named ``name`` allocates in (COMMON without a share)."""
        return self._parts.get(name, self._parts[COMMON])[0]

    def region_at(self, offset: int) -> Region:
        return self.regions[max(0, bisect.bisect_right(self._starts, offset) - 1)]

    # -- the ArenaAllocator interface, with the region named -----------------------------

    def allocate(self, size: int, region: str = COMMON) -> int | None:
        """Offset of ``size`` bytes inside ``region``'s slice, or None when it is full."""
        r, alloc = self._parts.get(region, self._parts[COMMON])
        at = alloc.allocate(size)
        return at if at is None or not r.offset else r.offset + at

    def reserve_at(self, offset: int, size: int) -> None:
        r = self.region_at(offset)
        if offset + size > r.end or r.name not in self._parts:
            raise BadRequest(f"extent [{offset}, {offset + size}) crosses the end of region "
                             f"{r.name or 'common'!r} [{r.offset}, {r.end})")
        self._parts[r.name][1].reserve_at(offset - r.offset, size)

    def reserve_many(self, extents: Sequence[tuple[int, int]]) -> list[int]:
        """``reserve_at`` of many extents, each region's in one pass; returns the
        positions of those refused (not free, or crossing their region's end)."""
        if len(self.regions) == 1:  # no shares: the one region is the whole arena
            return self._parts[COMMON][1].reserve_many(extents)
        refused, groups = [], {}
        for n, (offset, size) in enumerate(extents):
            r = self.region_at(offset)
            if offset + size > r.end or r.name not in self._parts:
                refused.append(n)
            else:
                groups.setdefault(r.name, ([], []))
                groups[r.name][0].append(n)
                groups[r.name][1].append((offset - r.offset, size))
        for name, (positions, local) in groups.items():
            refused += [positions[n] for n in self._parts[name][1].reserve_many(local)]
        return refused

    def free(self, offset: int) -> None:
        r = self.region_at(offset)
        if r.name not in self._parts:
            raise BadRequest(f"offset {offset} is not allocated")
        self._parts[r.name][1].free(offset - r.offset)

    def used_in(self, region: str) -> int:
        return self._parts.get(region, self._parts[COMMON])[1].used

    @property
    def used(self) -> int:
        parts = self._allocators
        return parts[0].used if len(parts) == 1 else sum(a.used for a in parts)

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.used

    @property
    def largest_free(self) -> int:
        return max(a.largest_free for _, a in self._parts.values())

    @property
    def fragmentation(self) -> float:
        free = self.free_bytes
        return 0.0 if free == 0 else 1.0 - self.largest_free / free

    def check(self) -> None:
        for r, alloc in self._parts.values():
            alloc.check()
            assert alloc.capacity == r.size, f"region {r.name!r} lost bytes to alignment"
