"""The master's view of the pool's nodes: their tiers, arenas' allocators, and links."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from kvpool.daemon_link import DaemonLink, TierDescription
from kvpool.tiers.base import TIER_ORDER, TierKind
from master.regions import COMMON, Region, RegionAllocator, layout


@dataclass(slots=True)
class TierSpace:
    """One tier of one node: capacity, use, and for arenas the allocator and base address."""

    kind: TierKind
    capacity: int
    address: int = 0
    mem_type: str = "DRAM"
    device: int = 0
    allocator: RegionAllocator | None = None
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

    def take_many(self, extents: Sequence[tuple[int, int]]) -> list[int]:
        """``take`` of many replicas (an inventory page) at once; returns the positions of
        those an arena refuses (their extent is not free in it)."""
        if self.allocator is not None:
            return self.allocator.reserve_many(extents)
        self.cold_used += sum(size for _, size in extents)
        return []

    def release(self, location: int, size: int) -> None:
        if self.allocator is not None:
            self.allocator.free(location)
        else:
            self.cold_used = max(0, self.cold_used - size)


class NodeState(enum.Enum):
    """ACTIVE -> DRAINING -> DRAINED (it can be stopped) or STUCK (the drain's deadline
    passed with blocks left: ``note`` says why); a drain may start again from STUCK or
    DRAINED, and an undrain returns any of them to ACTIVE."""

    ACTIVE = "active"
    DRAINING = "draining"
    DRAINED = "drained"
    STUCK = "stuck"

    @property
    def accepts(self) -> bool:
        """Does a node in this state take new blocks?"""
        return self is NodeState.ACTIVE


_NODE_CHANGES = {
    NodeState.ACTIVE: {NodeState.DRAINING},
    NodeState.DRAINING: {NodeState.DRAINED, NodeState.STUCK, NodeState.ACTIVE},
    NodeState.DRAINED: {NodeState.DRAINING, NodeState.ACTIVE},
    NodeState.STUCK: {NodeState.DRAINING, NodeState.ACTIVE},
}


@dataclass(slots=True)
class DrainProgress:
    """What a drain did so far, as ``/v1/nodes`` and ``kvpool status`` show it."""

    moved: int = 0  # blocks copied to another node or to the shared object tier
    dropped: int = 0  # replicas forgotten here because a copy exists elsewhere
    waiting_leases: int = 0  # blocks held here by readers' leases at the last pass
    left: int = 0  # blocks with a replica here at the last pass
    note: str = ""  # why it is stuck, or what it waits for
    started: float = 0.0  # wall clock
    finished: float = 0.0


@dataclass(slots=True)
class Node:
    node_id: str
    url: str
    agent: str  # NIXL agent name; a new one on every daemon start
    tiers: dict[TierKind, TierSpace]
    link: DaemonLink
    lease: int = 0  # single node: the membership lease the master keeps for it
    ttl_s: float = 5.0  # its membership lease's TTL
    state: NodeState = NodeState.ACTIVE
    drain: DrainProgress = field(default_factory=DrainProgress)
    metadata: bytes = b""  # NIXL metadata of all its arenas: for the master and its peers
    # Region name -> NIXL metadata of that region (one blob per arena tier): what a client
    # of the tenant owning it gets. Empty without shares: every client gets ``metadata``.
    region_metadata: dict[str, list[bytes]] = field(default_factory=dict)

    def metadata_for(self, region: str | None) -> list[bytes]:
        """What a client of ``region`` may load (None: a caller that sees the whole node)."""
        if region is None or not self.region_metadata:
            return [self.metadata]
        return self.region_metadata.get(region, self.region_metadata.get(COMMON, []))

    def layout(self) -> list[tuple[TierKind, Region]]:
        """Every arena region of this node, as the daemon registers them."""
        return [(kind, r) for kind, space in self.tiers.items() if space.allocator is not None
                for r in space.allocator.regions if r.size]

    def become(self, to: NodeState) -> None:
        """Change state along _NODE_CHANGES only; anything else is a bug in the master."""
        if to not in _NODE_CHANGES[self.state]:
            raise AssertionError(f"node {self.node_id} is {self.state.value}; it cannot become "
                                 f"{to.value}")
        self.state = to

    def below(self, tier: TierKind) -> TierKind | None:
        """The next slower tier this node has, where demotion goes."""
        for kind in TIER_ORDER:
            if kind.rank > tier.rank and kind in self.tiers:
                return kind
        return None


def tier_spaces(tiers: Sequence[TierDescription], alignment: int,
                shares: Mapping[str, float] | None = None) -> dict[TierKind, TierSpace]:
    """The master's accounting for tiers as a daemon announces them; each arena is cut
    into the tenants' regions (master.regions) by ``shares``."""
    out: dict[TierKind, TierSpace] = {}
    for t in tiers:
        space = TierSpace(t.kind, t.capacity, t.address, t.mem_type, t.device, store=t.store)
        if t.kind.is_arena:
            space.allocator = RegionAllocator(t.capacity, alignment,
                                              layout(t.capacity, alignment, shares or {}))
        out[t.kind] = space
    return out
