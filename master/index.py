"""The global index: block key -> entry (state, header, replicas, leases, pins).

Kept in memory and rebuilt from the daemons' inventories; nothing here touches the
network. Per (node, tier) the index keeps blocks in least-recently-used order, which is
what demotion walks.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Iterator

from kvpool.errors import BadRequest
from kvpool.keys import BlockKey
from kvpool.tiers.base import TierKind


class BlockState(enum.Enum):
    """PENDING -> COMPLETE <-> MOVING; any of them -> REMOVED (when it leaves the index).
    Readers see COMPLETE and MOVING blocks (a move copies first and frees last)."""

    PENDING = "pending"
    COMPLETE = "complete"
    MOVING = "moving"  # a tier move (demotion, promotion) is in flight
    REMOVED = "removed"  # out of the index; whoever holds the entry after an await sees this

    @property
    def readable(self) -> bool:
        return self is BlockState.COMPLETE or self is BlockState.MOVING


class StateError(AssertionError):
    """A block was not in the state a transition expects: a bug in the master, never a
    race (callers that may race check the state first)."""


_TRANSITIONS = {
    BlockState.PENDING: {BlockState.COMPLETE, BlockState.REMOVED},
    BlockState.COMPLETE: {BlockState.MOVING, BlockState.REMOVED},
    BlockState.MOVING: {BlockState.COMPLETE, BlockState.REMOVED},
    BlockState.REMOVED: set(),
}


@dataclass(slots=True)
class Replica:
    node: str
    tier: TierKind
    location: int
    size: int


@dataclass(slots=True)
class BlockEntry:
    key: BlockKey
    size: int  # payload bytes
    state: BlockState
    replicas: list[Replica]
    header: bytes = b""  # encoded BlockHeader, set at commit
    put_id: int = 0  # the reservation that owns a PENDING entry
    deadline: float = 0.0  # PENDING: reclaimed after this
    parent: BlockKey | None = None
    children: int = 0  # cached successors; a block with any is worth more than its leaves
    pins: int = 0
    leases: dict[int, float] = field(default_factory=dict)  # lease id -> expiry

    def advance(self, to: BlockState, expect: BlockState) -> None:
        """Move to ``to`` from ``expect``; anything else is a StateError that says what was found."""
        if self.state is not expect or to not in _TRANSITIONS[expect]:
            raise StateError(f"block {self.key.hex()} is {self.state.value}; moving it to "
                             f"{to.value} expects {expect.value}")
        self.state = to

    def leased(self, now: float) -> bool:
        if self.leases:
            for lease, expiry in list(self.leases.items()):
                if expiry <= now:
                    del self.leases[lease]
        return bool(self.leases)

    def movable(self, now: float) -> bool:
        return self.state is BlockState.COMPLETE and not self.pins and not self.leased(now)

    def replica(self, node: str, tier: TierKind) -> Replica | None:
        for r in self.replicas:
            if r.node == node and r.tier == tier:
                return r
        return None

    def best(self) -> Replica | None:
        """The replica a reader should use: the fastest tier."""
        if len(self.replicas) == 1:
            return self.replicas[0]
        return min(self.replicas, key=lambda r: r.tier.rank, default=None)


class Index:
    def __init__(self) -> None:
        self.entries: dict[BlockKey, BlockEntry] = {}
        self._lru: dict[tuple[str, TierKind], OrderedDict[BlockKey, None]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: BlockKey) -> BlockEntry | None:
        return self.entries.get(key)

    def readable(self, key: BlockKey) -> BlockEntry | None:
        """The entry of a block readers may see (COMPLETE, or MOVING between tiers)."""
        entry = self.entries.get(key)
        return entry if entry is not None and entry.state.readable else None

    def add(self, entry: BlockEntry) -> None:
        if entry.key in self.entries:
            raise BadRequest(f"block {entry.key.hex()} is already indexed")
        self.entries[entry.key] = entry
        for r in entry.replicas:
            self._lru.setdefault((r.node, r.tier), OrderedDict())[entry.key] = None
        if entry.parent is not None and (parent := self.entries.get(entry.parent)) is not None:
            parent.children += 1

    def add_replica(self, entry: BlockEntry, replica: Replica) -> None:
        entry.replicas.append(replica)
        self._lru.setdefault((replica.node, replica.tier), OrderedDict())[entry.key] = None

    def drop_replica(self, entry: BlockEntry, replica: Replica) -> None:
        entry.replicas.remove(replica)
        lru = self._lru.get((replica.node, replica.tier))
        if lru is not None:
            lru.pop(entry.key, None)

    def remove(self, entry: BlockEntry) -> None:
        """Forget an entry (it becomes REMOVED); its replica list stays as it was, for the
        caller to free."""
        if entry.state is not BlockState.REMOVED:
            entry.advance(BlockState.REMOVED, entry.state)
        for r in entry.replicas:
            lru = self._lru.get((r.node, r.tier))
            if lru is not None:
                lru.pop(entry.key, None)
        if self.entries.get(entry.key) is entry:
            del self.entries[entry.key]
        if entry.parent is not None and (parent := self.entries.get(entry.parent)) is not None:
            parent.children = max(0, parent.children - 1)

    def touch(self, entry: BlockEntry) -> None:
        """A read: the entry becomes most recently used on every tier that holds it."""
        for r in entry.replicas:
            lru = self._lru.get((r.node, r.tier))
            if lru is not None and entry.key in lru:
                lru.move_to_end(entry.key)

    def coldest(self, node: str, tier: TierKind) -> Iterator[BlockEntry]:
        """Blocks on (node, tier), coldest first, leaves of a prefix before their parents."""
        keys = list(self._lru.get((node, tier), ()))
        later = []
        for key in keys:
            entry = self.entries.get(key)
            if entry is None:
                continue
            if entry.children:
                later.append(entry)
            else:
                yield entry
        yield from later

    def on(self, node: str) -> list[BlockEntry]:
        return [e for e in self.entries.values() if any(r.node == node for r in e.replicas)]

    def check(self) -> None:
        """Invariants the tests verify after mutations."""
        for (node, tier), lru in self._lru.items():
            for key in lru:
                entry = self.entries.get(key)
                assert entry is not None, f"LRU of {node}/{tier.value} holds unknown {key.hex()}"
                assert entry.replica(node, tier) is not None, f"LRU/replica mismatch {key.hex()}"
        for key, entry in self.entries.items():
            assert entry.key == key
            for r in entry.replicas:
                assert key in self._lru.get((r.node, r.tier), {}), f"{key.hex()} missing from LRU"
            assert entry.state is not BlockState.REMOVED, f"{key.hex()} is indexed but REMOVED"
            if entry.state.readable:
                assert entry.header, f"COMPLETE block {key.hex()} has no header"
