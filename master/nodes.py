"""The master's view of the pool's nodes: their tiers, arenas' allocators, and links."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kvpool.errors import BadRequest
from kvpool.tiers.base import TIER_ORDER, TierKind
from kvpool.wire import RpcClient
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

    def fill(self) -> float:
        return self.used / self.capacity if self.capacity else 1.0


@dataclass(slots=True)
class Node:
    node_id: str
    url: str
    agent: str  # NIXL agent name; a new one on every daemon start
    tiers: dict[TierKind, TierSpace]
    link: RpcClient
    lease: int = 0

    def below(self, tier: TierKind) -> TierKind | None:
        """The next slower tier this node has, where demotion goes."""
        for kind in TIER_ORDER:
            if kind.rank > tier.rank and kind in self.tiers:
                return kind
        return None


def parse_tiers(raw: Any, alignment: int) -> dict[TierKind, TierSpace]:
    """Tiers as a daemon announces them at registration."""
    if not isinstance(raw, list) or not raw:
        raise BadRequest("registration needs a non-empty list of tiers")
    tiers: dict[TierKind, TierSpace] = {}
    for item in raw:
        try:
            kind = TierKind(item["kind"])
            capacity = int(item["capacity"])
            space = TierSpace(kind, capacity, int(item.get("address", 0)),
                              str(item.get("mem_type", "DRAM")), int(item.get("device", 0)),
                              store=str(item.get("store", "")))
        except (KeyError, TypeError, ValueError) as exc:
            raise BadRequest(f"bad tier description {item!r}: {exc}") from None
        if kind.is_arena:
            space.allocator = ArenaAllocator(capacity, alignment)
        tiers[kind] = space
    return tiers
