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


RANK = {"gpu": 0, "host": 1, "ssd": 2, "object": 3}  # fastest first


@dataclass(slots=True)
class _History:
    """What a block's past says about its future, shared by the tiers of one factory so
    it follows the block between them. Kept only while some tier holds the block or one
    of its children, so it is bounded by what the tiers hold."""

    hits: int = 0  # reads served since the block was written
    tail: bool = False  # the last block of a put run: a request's trailing partial block
    holders: list[ReuseAware] = field(default_factory=list)  # the tiers that hold it
    kids: list[int] = field(default_factory=lambda: [0, 0, 0, 0])  # children held, per tier rank

    def leaf_in(self, rank: int) -> bool:
        """No child cached in this tier or a faster one: an eviction candidate there."""
        return not any(self.kids[: rank + 1])


@dataclass(slots=True)
class _Entry:
    parent: bytes | None
    stamp: int  # the tier's clock at the last write or read
    prio: tuple[int, int] | None = None  # as pushed on the heap; None while not a leaf


@dataclass(slots=True)
class ReuseAware:
    """Least recently used among the leaves of this tier, with two corrections the
    conversation trace asks for:

    - the last block of each put run (a request's trailing partial block: its next turn
      rewrites it with more tokens, so it is reused 0.8% of the time against 24% for a
      full block) is the first victim, and a cold tier does not admit it;
    - a block that has been read ranks ``bonus`` capacities of writes above one that has
      not (a block read once is read again 42% of the time; a new one is read 24%).

    Age is counted in bytes written into the tier (its turnover), never in seconds, so the
    policy behaves the same under any time compression. Leaves first: a block with a
    child cached in this tier or a faster one is yielded only after every leaf.
    """

    tier: str
    capacity: int  # bytes
    history: dict[bytes, _History]
    bonus: float = 0.25  # capacities of writes a read block ranks above an unread one
    admit_tails: bool = False
    name: str = "reuse"
    _rank: int = 0
    _bonus: int = 0  # the same, in bytes
    _entries: dict[bytes, _Entry] = field(default_factory=dict)
    _heap: list[tuple[tuple[int, int], int, bytes]] = field(default_factory=list)
    _seq: itertools.count = field(default_factory=itertools.count)
    _clock: int = 0
    _last: bytes | None = None  # written last: a write that does not chain from it starts a run

    def __post_init__(self) -> None:
        self._rank = RANK.get(self.tier, len(RANK) - 1)
        self._bonus = int(self.bonus * self.capacity)

    def admit(self, info: BlockInfo, now: float) -> bool:
        """Cold-tier admission: a trailing block is not worth the write."""
        h = self.history.get(info.key)
        return self.admit_tails or h is None or not h.tail or h.hits > 0

    def _history(self, key: bytes) -> _History:
        h = self.history.get(key)
        if h is None:
            h = self.history[key] = _History()
        return h

    def _forget(self, key: bytes, h: _History) -> None:
        if not h.holders and not any(h.kids):
            del self.history[key]

    def _push(self, key: bytes, e: _Entry) -> None:
        """(Re)rank a block; only leaves go on the heap."""
        h = self.history[key]
        if not h.leaf_in(self._rank):
            e.prio = None
            return
        prio = (0, e.stamp) if h.tail and not h.hits else (1, e.stamp + (self._bonus if h.hits else 0))
        if prio == e.prio:  # on the heap already (a read between writes): a duplicate would
            return          # survive every compaction, making each later push O(blocks)
        e.prio = prio
        heapq.heappush(self._heap, (e.prio, next(self._seq), key))
        if len(self._heap) > 2 * len(self._entries) + 64:  # drop stale entries
            self._heap = [x for x in self._heap
                          if (y := self._entries.get(x[2])) is not None and y.prio == x[0]]
            heapq.heapify(self._heap)

    def _kid_changed(self, parent: bytes | None, delta: int) -> None:
        """A child of ``parent`` entered (+1) or left (-1) this tier: tell every tier that
        holds the parent, whose leaf-ness may change (this one and the slower ones)."""
        if parent is None:
            return
        ph = self._history(parent)
        ph.kids[self._rank] += delta
        for pol in ph.holders:
            if pol._rank >= self._rank:
                pe = pol._entries[parent]
                if delta > 0:
                    pe.prio = None
                elif pe.prio is None:
                    pol._push(parent, pe)
        self._forget(parent, ph)

    def inserted(self, info: BlockInfo, now: float) -> None:
        key = info.key
        if key in self._entries:
            return
        if self._rank <= RANK["host"] and (info.parent is None or info.parent in self._entries):
            # a write (or promotion) extending a chain held here: runs are told apart only
            # where writes land, never from demotions, which arrive leaves first
            last = self._last
            if last is not None and info.parent != last and last in self._entries:
                self.history[last].tail = True  # the run that wrote it ended with it
                self._push(last, self._entries[last])
            self._last = key
        self._clock += info.size
        h = self._history(key)
        h.holders.append(self)
        e = self._entries[key] = _Entry(info.parent, self._clock)
        self._kid_changed(info.parent, +1)
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
        h.holders.remove(self)
        self._forget(key, h)
        if key == self._last:
            self._last = None
        self._kid_changed(e.parent, -1)

    def victims(self) -> Iterator[bytes]:
        """Leaves in rank order (walking the heap without popping live entries), then the
        blocks that still have a cached child, least recently used first."""
        heap, entries = self._heap, self._entries
        while heap and ((e := entries.get(heap[0][2])) is None or e.prio != heap[0][0]):
            heapq.heappop(heap)  # stale: read and re-pushed, gained a child, or left
        frontier = [(heap[0][0], heap[0][1], 0)] if heap else []
        while frontier:
            prio, _, i = heapq.heappop(frontier)
            key = heap[i][2]
            e = entries.get(key)
            if e is not None and e.prio == prio:
                yield key
            for c in (2 * i + 1, 2 * i + 2):
                if c < len(heap):
                    heapq.heappush(frontier, (heap[c][0], heap[c][1], c))
        yield from (k for _, k in sorted((e.stamp, k) for k, e in entries.items() if e.prio is None))

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(slots=True)
class ReuseAwareFactory:
    """One shared history for every tier it makes (reads and tail marks follow a block
    between tiers; each tier knows which of its blocks have a child in a faster one)."""

    bonus: float = 0.25
    admit_tails: bool = False
    name: str = "reuse"
    history: dict[bytes, _History] = field(default_factory=dict)

    def make(self, tier: str, capacity_bytes: int) -> EvictionPolicy:
        return ReuseAware(tier, capacity_bytes, self.history, self.bonus, self.admit_tails)


POLICIES: dict[str, Callable[[], PolicyFactory]] = {
    "lru": LRUFactory,
    "reuse": ReuseAwareFactory,
}
DEFAULT_POLICY = "reuse"
