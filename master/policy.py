"""Eviction and admission policies: which blocks of one tier go first, and which may enter
a cold tier.

Pure logic, no I/O and no index: the master tells a policy what arrived, what was read
and what left, and walks ``victims()`` when a tier is over its watermark, skipping what it
cannot move (leased, pinned, a block with a cached child in this or a faster tier).
"""

from __future__ import annotations

import heapq
import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol


@dataclass(frozen=True, slots=True)
class BlockInfo:
    """What a policy learns of a block when it enters a tier."""

    key: bytes  # 16-byte block key
    size: int  # payload bytes
    parent: bytes | None  # the key this block chains from; None for a first block


class EvictionPolicy(Protocol):
    """Orders the blocks of ONE tier of one node (or one shared store) for eviction."""

    name: str

    def admit(self, info: BlockInfo, now: float) -> bool:
        """May this block enter this tier as a demotion target? (Writes into the fastest
        tier are never asked.)"""
        ...

    def inserted(self, info: BlockInfo, now: float) -> None:
        """A replica arrived: a write, a demotion, a promotion, an inventory at restart."""
        ...

    def accessed(self, key: bytes, now: float) -> None:
        """A read hit of a block this tier holds (prefix-match hits included)."""
        ...

    def removed(self, key: bytes) -> None:
        """The replica left this tier (evicted, demoted, deleted)."""
        ...

    def victims(self) -> Iterator[bytes]:
        """Keys this tier holds, best victim first."""
        ...

    def __len__(self) -> int: ...


class PolicyFactory(Protocol):
    """Makes the policy of each tier; one factory per master, so the policies it makes may
    share history (a block's history follows it between tiers)."""

    name: str

    def make(self, tier: str, capacity_bytes: int) -> EvictionPolicy: ...


@dataclass(slots=True)
class LRU:
    """Least recently used first. Admits everything."""

    name: str = "lru"
    _order: OrderedDict[bytes, None] = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self._order = OrderedDict()

    def admit(self, info: BlockInfo, now: float) -> bool:
        return True

    def inserted(self, info: BlockInfo, now: float) -> None:
        self._order[info.key] = None
        self._order.move_to_end(info.key)

    def accessed(self, key: bytes, now: float) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def removed(self, key: bytes) -> None:
        self._order.pop(key, None)

    def victims(self) -> Iterator[bytes]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)


@dataclass(frozen=True, slots=True)
class LRUFactory:
    name: str = "lru"

    def make(self, tier: str, capacity_bytes: int) -> EvictionPolicy:
        return LRU()


@dataclass(slots=True)
class _History:
    """What a block's past says about its future, shared by the tiers of one factory so
    it follows the block between them. Kept only while some tier holds the block."""

    hits: int = 0  # reads served since the block was written
    tail: bool = False  # the last block of a put run: a request's trailing partial block
    holders: int = 0  # tiers of this factory that hold it


@dataclass(slots=True)
class _Entry:
    parent: bytes | None
    stamp: int  # the tier's clock at the last write or read
    kids: int = 0  # children held in this tier
    prio: tuple[int, int] | None = None  # as pushed on the heap; None while not a leaf


@dataclass(slots=True)
class ReuseAware:
    """Least recently used among the leaves of this tier, with two corrections the
    conversation trace asks for:

    - the last block of each put run (a request's trailing partial block; its next turn
      rewrites that block with more tokens, so it is reused 0.8% of the time against 24%
      for a full block) is the first victim;
    - a block that has been read is worth ``bonus`` capacities of writes more than one
      that has not (a read block is read again 42% of the time, an unread one 24%).

    Age is counted in bytes written into the tier (its turnover), never in seconds, so the
    policy behaves the same under any time compression. Leaves first: a block with a
    child in this tier is no candidate (it is yielded last, after every leaf).
    """

    capacity: int  # bytes
    history: dict[bytes, _History]
    bonus: float = 2.0
    admit_tails: bool = False
    name: str = "reuse"
    _entries: dict[bytes, _Entry] = field(default_factory=dict)
    _heap: list[tuple[tuple[int, int], int, bytes]] = field(default_factory=list)
    _seq: itertools.count = field(default_factory=itertools.count)
    _clock: int = 0
    _last: bytes | None = None  # the block written last: a write that does not chain from it starts a new run

    def admit(self, info: BlockInfo, now: float) -> bool:
        """Cold-tier admission: a trailing block is not worth an SSD write."""
        h = self.history.get(info.key)
        return self.admit_tails or h is None or not h.tail

    def _prio(self, key: bytes, e: _Entry) -> tuple[int, int]:
        h = self.history[key]
        if h.tail and not h.hits:
            return (0, e.stamp)
        return (1, e.stamp + (int(self.bonus * self.capacity) if h.hits else 0))

    def _push(self, key: bytes, e: _Entry) -> None:
        if e.kids:
            e.prio = None
            return
        e.prio = self._prio(key, e)
        heapq.heappush(self._heap, (e.prio, next(self._seq), key))
        if len(self._heap) > 2 * len(self._entries) + 64:  # drop stale entries
            self._heap = [x for x in self._heap if (e2 := self._entries.get(x[2])) is not None
                          and e2.prio == x[0]]
            heapq.heapify(self._heap)

    def inserted(self, info: BlockInfo, now: float) -> None:
        key, parent = info.key, info.parent
        if key in self._entries:
            return
        last = self._last
        if last is not None and parent != last and last in self._entries:
            self.history[last].tail = True  # the run that wrote it ended with it
            le = self._entries[last]
            if not le.kids:
                self._push(last, le)
        self._last = key
        self._clock += info.size
        h = self.history.get(key)
        if h is None:
            h = self.history[key] = _History()
        h.holders += 1
        e = self._entries[key] = _Entry(parent, self._clock)
        pe = self._entries.get(parent) if parent is not None else None
        if pe is not None:
            pe.kids += 1
            pe.prio = None
        self._push(key, e)

    def accessed(self, key: bytes, now: float) -> None:
        e = self._entries.get(key)
        if e is None:
            return
        self.history[key].hits += 1
        e.stamp = self._clock
        self._push(key, e)

    def removed(self, key: bytes) -> None:
        e = self._entries.pop(key, None)
        if e is None:
            return
        h = self.history[key]
        h.holders -= 1
        if h.holders <= 0:
            del self.history[key]
        if key == self._last:
            self._last = None
        pe = self._entries.get(e.parent) if e.parent is not None else None
        if pe is not None:
            pe.kids -= 1
            if not pe.kids:
                self._push(e.parent, pe)  # type: ignore[arg-type]

    def victims(self) -> Iterator[bytes]:
        """Leaves in priority order (walking the heap without popping it), then the
        blocks that still have a child here, least recently used first."""
        heap = self._heap
        while heap and ((e := self._entries.get(heap[0][2])) is None or e.prio != heap[0][0]):
            heapq.heappop(heap)  # stale: the block was read, re-pushed, gained a child or left
        frontier = [(heap[0][0], heap[0][1], 0)] if heap else []
        while frontier:
            prio, _, i = heapq.heappop(frontier)
            key = heap[i][2]
            e = self._entries.get(key)
            if e is not None and e.prio == prio:
                yield key
            for c in (2 * i + 1, 2 * i + 2):
                if c < len(heap):
                    heapq.heappush(frontier, (heap[c][0], heap[c][1], c))
        inner = sorted((e.stamp, k) for k, e in self._entries.items() if e.prio is None)
        yield from (k for _, k in inner)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(slots=True)
class ReuseAwareFactory:
    """One shared history for every tier it makes."""

    bonus: float = 2.0
    admit_tails: bool = False
    name: str = "reuse"
    history: dict[bytes, _History] = field(default_factory=dict)

    def make(self, tier: str, capacity_bytes: int) -> EvictionPolicy:
        return ReuseAware(capacity_bytes, self.history, self.bonus, self.admit_tails)


POLICIES: dict[str, Callable[[], PolicyFactory]] = {
    "lru": LRUFactory,
    "reuse": ReuseAwareFactory,
}
DEFAULT_POLICY = "reuse"
