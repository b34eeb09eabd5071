"""The master's view of the pool's nodes: their tiers, arenas' allocators, and links."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from kvpool.daemon_link import DaemonLink, TierDescription
from kvpool.tiers.base import TIER_ORDER, TierKind
from master.allocator import ArenaAllocator


@dataclass(slots=True)
class TierSpace:
    """One tier of one node: capacity, use, and for arenas the allocator and base address."""

    kind: TierKind
    capacity: int
    address: int = 0
    mem_type: str = "DRAM"
    device: int = 0
    allocator: ArenaAllocator | None = None
    cold_used: int = 0  # cold tiers: bytes of replicas the index holds there
    store: str = ""  # a shared object store: every node naming it holds this same TierSpace

    @property
    def used(self) -> int:
        return self.allocator.used if self.allocator is not None else self.cold_used

    @property
    def free(self) -> int:
        return self.capacity - self.used

    def take(self, location: int, size: int) -> None:
        """Account for a replica that is already there (an inventory, a finished copy)."""
        if self.allocator is not None:
            self.allocator.reserve_at(location, size)
        else:
            self.cold_used += size

    def release(self, location: int, size: int) -> None:
        if self.allocator is not None:
            self.allocator.free(location)
        else:
            self.cold_used = max(0, self.cold_used - size)


@dataclass(slots=True)
class Node:
    node_id: str
    url: str
    agent: str  # NIXL agent name; a new one on every daemon start
    tiers: dict[TierKind, TierSpace]
    link: DaemonLink
    lease: int = 0  # single node: the membership lease the master keeps for it
    ttl_s: float = 5.0  # its membership lease's TTL

    def below(self, tier: TierKind) -> TierKind | None:
        """The next slower tier this node has, where demotion goes."""
        for kind in TIER_ORDER:
            if kind.rank > tier.rank and kind in self.tiers:
                return kind
        return None


def tier_spaces(tiers: Sequence[TierDescription], alignment: int) -> dict[TierKind, TierSpace]:
    """The master's accounting for tiers as a daemon announces them."""
    out: dict[TierKind, TierSpace] = {}
    for t in tiers:
        space = TierSpace(t.kind, t.capacity, t.address, t.mem_type, t.device, store=t.store)
        if t.kind.is_arena:
            space.allocator = ArenaAllocator(t.capacity, alignment)
        out[t.kind] = space
    return out
