"""Eviction and admission policies: which blocks of one tier go first, and which may enter
a cold tier.

Pure logic, no I/O and no index: the master tells a policy what arrived, what was read
and what left, and walks ``victims()`` when a tier is over its watermark, skipping what it
cannot move (leased, pinned, a block with a cached child in this or a faster tier).
"""

from __future__ import annotations

import heapq
import itertools
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

from master import rank_counts


@dataclass(slots=True)
class BlockInfo:
    """What a policy learns of a block when it enters a tier (one per replica put or
    taken in: not frozen, which triples the cost of making one)."""

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

    def inserted_many(self, infos: Sequence[BlockInfo], now: float) -> None:
        """Replicas arrived together, in this order (an inventory page, a chain): the same
        as ``inserted`` for each, in less time (a block whose child follows is ranked once)."""
        ...

    def accessed(self, key: bytes, now: float) -> None:
        """A read hit of a block this tier holds (prefix-match hits included)."""
        ...

    def removed(self, key: bytes) -> None:
        """The replica left this tier (evicted, demoted, deleted)."""
        ...

    def victims(self, leaves_only: bool = False) -> Iterator[bytes]:
        """Keys this tier holds, best victim first: leaves (no child cached in this tier or
        a faster one) before the others, which ``leaves_only`` leaves out."""
        ...

    def rank(self, key: bytes) -> tuple:
        """Where a block this tier holds would stand in ``victims()`` order were it a leaf
        (lower goes first): a block whose children are evicted takes its place there."""
        ...

    def keys(self) -> Iterable[bytes]:
        """Every key this tier holds (what a node's drop or drain walks), in no set order."""
        ...

    def clock(self) -> int:
        """The tier's clock now: it advances with every byte written into the tier."""
        ...

    def touched_before(self, clock: int) -> Iterator[bytes]:
        """Keys last written or read here while the tier's clock read at most ``clock``,
        least recently first: a prefix of the tier's order, so walking it costs what it
        yields (the last tier's TTL), not what the tier holds."""
        ...

    def __len__(self) -> int: ...


class PolicyFactory(Protocol):
    """Makes the policy of each tier; one factory per master, so the policies it makes may
    share history (a block's history follows it between tiers)."""

    name: str

    def make(self, tier: str, capacity_bytes: int) -> EvictionPolicy: ...

    def close(self) -> None:
        """Its tiers are let go (a term ended): drop what ties them together."""
        ...


class _SharedHistory:
    """The history a factory's tiers share. Each block's history names the tiers holding
    it, and each tier reaches the histories: a cycle, which ``close`` cuts so that a
    dropped index goes by reference counting at once (kvpool.heap freezes what a full
    collection would have to find)."""

    __slots__ = ()
    history: dict[bytes, "_History"]

    def close(self) -> None:
        self.history.clear()


RANK = {"gpu": 0, "host": 1, "ssd": 2, "object": 3}  # fastest first


@dataclass(slots=True)
class _History:
    """What a block's past says about its future, shared by the tiers of one factory so
    it follows the block between them. Kept only while some tier holds the block or one
    of its children, so it is bounded by what the tiers hold."""

    hits: int = 0  # reads served since the block was written
    tail: bool = False  # the last block of a put run: a request's trailing partial block
    holders: tuple[ReuseAware | HitDensity, ...] = ()  # the tiers that hold it
    kids: int = rank_counts.NONE  # children held, per tier rank (master.rank_counts)
    depth: int = 1  # blocks in its chain, itself included (1: a first block)
    cont: bool = False  # written by a request that continued a cached prefix of 2+ blocks

    def leaf_in(self, rank: int) -> bool:
        """No child cached in this tier or a faster one: an eviction candidate there."""
        return not rank_counts.any_upto(self.kids, rank)


def _admits(history: dict[bytes, _History], key: bytes, rank: int, admit_tails: bool) -> bool:
    """Cold-tier admission: a trailing block never read is not worth the write (an arena
    admits every demotion)."""
    h = history.get(key)
    return admit_tails or rank <= RANK["host"] or h is None or not h.tail or h.hits > 0


def _history(history: dict[bytes, _History], key: bytes) -> _History:
    h = history.get(key)
    if h is None:
        h = history[key] = _History()
    return h


def _forget(history: dict[bytes, _History], key: bytes, h: _History) -> None:
    if not h.holders and not h.kids:
        del history[key]


def _without(holders: tuple[ReuseAware | HitDensity, ...], tier: ReuseAware | HitDensity
             ) -> tuple[ReuseAware | HitDensity, ...]:
    i = holders.index(tier)  # a ValueError, as list.remove's, if it never held the block
    return holders[:i] + holders[i + 1:]


def _copied_above(h: _History, rank: int) -> bool:
    """Does a faster tier hold the block too? (Promotion keeps the cold copy.)"""
    return rank > RANK["host"] and any(t._rank < rank for t in h.holders)


def _touched_before(entries: dict[bytes, Any], clock: int) -> Iterator[bytes]:
    """Keys stamped at or before ``clock``: a tier's entries are kept in stamp order (a
    touch moves its key to the end), so the walk stops at the first later one."""
    for key, e in entries.items():
        if e.stamp > clock:
            return
        yield key


def _tell_slower(tier: ReuseAware | HitDensity, key: bytes, h: _History) -> None:
    """``tier`` took or dropped a copy: the slower tiers holding the block re-rank it."""
    for pol in h.holders:
        if pol._rank > tier._rank and isinstance(pol, ReuseAware):
            pol._relink(key)


def _kid_changed(tier: ReuseAware | HitDensity, parent: bytes | None, delta: int) -> None:
    """A child of ``parent`` entered (+1) or left (-1) ``tier``: tell every tier that holds
    the parent, whose leaf-ness may change (this one and the slower ones)."""
    if parent is None:
        return
    ph = _history(tier.history, parent)
    ph.kids = rank_counts.bumped(ph.kids, tier._rank, delta)
    for pol in ph.holders:
        if pol._rank >= tier._rank:
            pol._relink(parent)
    _forget(tier.history, parent, ph)


def _arrive(tier: ReuseAware | HitDensity, info: BlockInfo) -> _History:
    """The history of a block arriving in ``tier``: its depth, and at a write (or a
    promotion) extending a chain held there, its run. Runs are told apart only where
    writes land, never from demotions, which arrive leaves first: a write that does not
    chain from the block written last starts a run, and the one before ended there."""
    h = tier.history.get(info.key)
    fresh = h is None
    if h is None:
        h = tier.history[info.key] = _History()
        ph = tier.history.get(info.parent) if info.parent is not None else None
        h.depth = ph.depth + 1 if ph is not None else 1
    if tier._rank <= RANK["host"] and (info.parent is None or info.parent in tier._entries):
        last = tier._last
        if last is None or info.parent != last:
            # the run before ended with ``last``: its trailing block, if it chained from
            # something (a put without chain links has no runs to tell apart)
            if last is not None and last in tier._entries and tier._entries[last].parent is not None:
                tier.history[last].tail = True
                tier._retail(last)
            if fresh:  # continuing a cached prefix of 2+ blocks
                h.cont = h.depth > 2
        elif fresh:
            h.cont = tier.history[last].cont
        tier._last = info.key
    return h


@dataclass(slots=True)
class _Entry:
    parent: bytes | None
    stamp: int  # the tier's clock at the last write or read
    tick: int  # orders writes and reads that the clock (bytes written) does not tell apart
    prio: tuple[int, int, int] | None = None  # as pushed on the heap; None while not a leaf
    seq: int = -1  # the heap item that ranks it (older items for it are stale)


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
    child cached in this tier or a faster one is yielded only after every leaf. In a cold
    tier a block that a faster tier holds too is yielded before everything: dropping that
    copy leaves the block cached. ``penalty`` (0 by default: measured no better) ranks an
    unread block written by a request that continued a cached prefix (reused 13-15% of
    the time against 26% for a fresh request's) below the others. With no corrections
    (``LRU()``) it is plain least recently used among leaves.
    """

    tier: str
    capacity: int  # bytes
    history: dict[bytes, _History]
    bonus: float = 0.25  # capacities of writes a read block ranks above an unread one
    admit_tails: bool = False
    tails_first: bool = True
    penalty: float = 0.0  # capacities an unread block of a continuing request ranks below
    name: str = "reuse"
    _rank: int = 0
    _bonus: int = 0  # the same, in bytes
    _penalty: int = 0
    _entries: dict[bytes, _Entry] = field(default_factory=dict)
    _heap: list[tuple[tuple[int, int, int], int, bytes]] = field(default_factory=list)
    _ranked: int = 0  # entries with a live item on the heap (``prio`` set)
    _seq: itertools.count = field(default_factory=itertools.count)
    _clock: int = 0
    _last: bytes | None = None  # written last: a write that does not chain from it starts a run
    _deferred: dict[bytes, None] | None = None  # in inserted_many: keys to rank at its end

    def __post_init__(self) -> None:
        self._rank = RANK.get(self.tier, len(RANK) - 1)
        self._bonus = int(self.bonus * self.capacity)
        self._penalty = int(self.penalty * self.capacity)

    def admit(self, info: BlockInfo, now: float) -> bool:
        return _admits(self.history, info.key, self._rank, self.admit_tails)

    def _history(self, key: bytes) -> _History:
        return _history(self.history, key)

    def _forget(self, key: bytes, h: _History) -> None:
        _forget(self.history, key, h)

    def _prio(self, h: _History, e: _Entry) -> tuple[int, int, int]:
        if _copied_above(h, self._rank):  # evicting this copy loses nothing cached
            return (-1, e.stamp, e.tick)
        if h.tail and not h.hits and self.tails_first:
            return (0, e.stamp, e.tick)
        if h.hits:
            return (1, e.stamp + self._bonus, e.tick)
        return (1, e.stamp - (self._penalty if h.cont else 0), e.tick)

    def rank(self, key: bytes) -> tuple[int, int, int]:
        return self._prio(self.history[key], self._entries[key])

    def _push(self, key: bytes, e: _Entry) -> None:
        """(Re)rank a block; only candidates go on the heap: leaves, and in a cold tier the
        blocks a faster tier holds too."""
        if self._deferred is not None:
            self._deferred[key] = None
            return
        h = self.history[key]
        if not h.leaf_in(self._rank) and not _copied_above(h, self._rank):
            if e.prio is not None:
                self._ranked -= 1
            e.prio, e.seq = None, -1
            return
        prio = self._prio(h, e)
        if prio == e.prio:
            return  # ranked so already
        if e.prio is None:
            self._ranked += 1
        e.prio, e.seq = prio, next(self._seq)
        heapq.heappush(self._heap, (prio, e.seq, key))
        # Drop stale items once they outnumber the live ones: a chain's blocks are leaves
        # only until the next one comes, so most items go stale at once, and sized by the
        # tier (not by its leaves) the heap held two items per block.
        if len(self._heap) > 2 * self._ranked + 64:
            self._heap = [x for x in self._heap
                          if (y := self._entries.get(x[2])) is not None and y.seq == x[1]]
            heapq.heapify(self._heap)

    def _retail(self, key: bytes) -> None:
        self._push(key, self._entries[key])

    def _relink(self, key: bytes) -> None:
        """The block's leaf-ness here, or its copy in a faster tier, may have changed."""
        if self._deferred is not None:
            self._deferred[key] = None
        else:
            self._push(key, self._entries[key])

    def inserted(self, info: BlockInfo, now: float) -> None:
        key = info.key
        if key in self._entries:
            return
        h = _arrive(self, info)
        self._clock += info.size
        h.holders = (*h.holders, self)
        _tell_slower(self, key, h)
        e = self._entries[key] = _Entry(info.parent, self._clock, next(self._seq))
        _kid_changed(self, info.parent, +1)
        self._push(key, e)

    def inserted_many(self, infos: Sequence[BlockInfo], now: float) -> None:
        """Ranks each block once, at the end, from its final state: a chain's blocks stop
        being leaves as the next arrives, and ranked on arrival each would go on the heap
        and go stale at once (a third of a rebuild's time)."""
        self._deferred = deferred = {}
        try:
            for info in infos:
                self.inserted(info, now)
        finally:
            self._deferred = None
            entries = self._entries
            for key in deferred:
                e = entries.get(key)
                if e is not None:
                    self._push(key, e)

    def accessed(self, key: bytes, now: float) -> None:
        e = self._entries.get(key)
        if e is None:
            return
        self.history[key].hits += 1
        e.stamp, e.tick = self._clock, next(self._seq)
        self._entries[key] = self._entries.pop(key)  # kept in (stamp, tick) order
        self._push(key, e)

    def removed(self, key: bytes) -> None:
        e = self._entries.pop(key, None)
        if e is None:
            return
        if e.prio is not None:
            self._ranked -= 1
        h = self.history[key]
        h.holders = _without(h.holders, self)
        _tell_slower(self, key, h)
        self._forget(key, h)
        if key == self._last:
            self._last = None
        _kid_changed(self, e.parent, -1)

    def victims(self, leaves_only: bool = False) -> Iterator[bytes]:
        """Leaves in rank order (walking the heap without popping live entries), then the
        blocks that still have a cached child, least recently used first (the entries'
        own order). Lazy: the cost is what the caller takes, never a sort of the tier; a
        caller takes without awaiting between keys."""
        heap, entries = self._heap, self._entries
        while heap and ((e := entries.get(heap[0][2])) is None or e.seq != heap[0][1]):
            heapq.heappop(heap)  # stale: read and re-pushed, gained a child, or left
        frontier = [(heap[0][0], heap[0][1], 0)] if heap else []
        while frontier:
            _, seq, i = heapq.heappop(frontier)
            key = heap[i][2]
            e = entries.get(key)
            if e is not None and e.seq == seq:
                yield key
            for c in (2 * i + 1, 2 * i + 2):
                if c < len(heap):
                    heapq.heappush(frontier, (heap[c][0], heap[c][1], c))
        if not leaves_only:
            yield from (k for k, e in entries.items() if e.prio is None)

    def keys(self) -> Iterable[bytes]:
        return self._entries.keys()

    def clock(self) -> int:
        return self._clock

    def touched_before(self, clock: int) -> Iterator[bytes]:
        return _touched_before(self._entries, clock)

    def __len__(self) -> int:
        return len(self._entries)


def LRU(tier: str = "host", history: dict[bytes, _History] | None = None) -> ReuseAware:
    """Plain least recently used among the leaves of a tier: ReuseAware without its two
    corrections. Admits everything."""
    return ReuseAware(tier, 0, {} if history is None else history, bonus=0.0, admit_tails=True,
                      tails_first=False, name="lru")


@dataclass(slots=True)
class LRUFactory(_SharedHistory):
    name: str = "lru"
    history: dict[bytes, _History] = field(default_factory=dict)

    def make(self, tier: str, capacity_bytes: int) -> EvictionPolicy:
        return LRU(tier, self.history)


@dataclass(slots=True)
class ReuseAwareFactory(_SharedHistory):
    """One shared history for every tier it makes (reads and tail marks follow a block
    between tiers; each tier knows which of its blocks have a child in a faster one)."""

    bonus: float = 0.25
    admit_tails: bool = False
    penalty: float = 0.0
    name: str = "reuse"
    history: dict[bytes, _History] = field(default_factory=dict)

    def make(self, tier: str, capacity_bytes: int) -> EvictionPolicy:
        return ReuseAware(tier, capacity_bytes, self.history, self.bonus, self.admit_tails,
                          penalty=self.penalty)


AGE_BUCKETS = 128  # ages a class's statistics tell apart, each 1/32 of the tier's capacity
N_CLASSES = 16  # (reads so far: 0, 1, 2, 3+) x (a trailing block) x (a continuing request's)


def _class(h: _History) -> int:
    return min(h.hits, 3) * 4 + h.tail * 2 + h.cont


@dataclass(slots=True)
class _DEntry:
    parent: bytes | None
    stamp: int  # the tier's clock at the last write or read
    cls: int  # the block's class since that moment
    leaf: int = -1  # its place in the tier's leaf list; -1 while a child is cached


@dataclass(slots=True)
class HitDensity:
    """Evicts the leaf with the least hit density: the hits a block of its class and age
    is expected to get per byte-time it will still occupy (LHD, Beckmann et al., NSDI
    2018), learned online from what happens in this tier.

    A block's class is (reads so far, trailing block of its put, written by a request
    that continued a cached prefix); its age is the bytes written into the tier since its
    last write or read. Each class counts, per age bucket, the hits and the evictions that
    happened at that age (decayed as the workload moves); from them the density of every
    (class, age) follows: hits still to come / expected space-time still to use. On this
    trace most blocks are never read again, and how long a class has gone unread says
    more than recency alone. Victims are the least dense of ``samples`` random leaves, so
    an eviction costs O(samples) whatever the tier holds. Leaves only: a block with a
    child cached in this tier or a faster one is yielded after every leaf.
    """

    tier: str
    capacity: int  # bytes
    history: dict[bytes, _History]
    samples: int = 64
    admit_tails: bool = False
    seed: int = 0
    name: str = "density"
    _rank: int = 0
    _width: int = 1  # bytes of age per bucket
    _entries: dict[bytes, _DEntry] = field(default_factory=dict)
    _leaves: list[bytes] = field(default_factory=list)
    _hits: list[list[float]] = field(default_factory=list)  # [class][age bucket]
    _ends: list[list[float]] = field(default_factory=list)
    _density: list[list[float]] = field(default_factory=list)
    _clock: int = 0
    _due: int = 0  # the clock at which the densities are next recomputed
    _last: bytes | None = None  # written last: a write that does not chain from it starts a run
    _rng: random.Random = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        self._rank = RANK.get(self.tier, len(RANK) - 1)
        self._width = max(1, self.capacity // 32)
        self._hits = [[0.0] * AGE_BUCKETS for _ in range(N_CLASSES)]
        self._ends = [[0.0] * AGE_BUCKETS for _ in range(N_CLASSES)]
        self._density = [[0.0] * AGE_BUCKETS for _ in range(N_CLASSES)]
        self._due = self._width * 4
        self._rng = random.Random(self.seed)

    def admit(self, info: BlockInfo, now: float) -> bool:
        return _admits(self.history, info.key, self._rank, self.admit_tails)

    def _bucket(self, e: _DEntry) -> int:
        return min((self._clock - e.stamp) // self._width, AGE_BUCKETS - 1)

    def _recompute(self) -> None:
        """Densities from the decayed event counts: from the oldest age down, hits still
        to come over the space-time the blocks alive at that age will use."""
        for c in range(N_CLASSES):
            hits, ends, dens = self._hits[c], self._ends[c], self._density[c]
            to_come = alive = spacetime = 0.0
            for b in range(AGE_BUCKETS - 1, -1, -1):
                to_come += hits[b]
                alive += hits[b] + ends[b]
                spacetime += alive
                dens[b] = to_come / spacetime if spacetime else 0.0
                hits[b] *= 0.9
                ends[b] *= 0.9
        self._due = self._clock + self._width * 4

    def _set_leaf(self, key: bytes, e: _DEntry, leaf: bool) -> None:
        leaves = self._leaves
        if leaf and e.leaf < 0:
            e.leaf = len(leaves)
            leaves.append(key)
        elif not leaf and e.leaf >= 0:
            moved = leaves.pop()
            if moved != key:
                leaves[e.leaf] = moved
                self._entries[moved].leaf = e.leaf
            e.leaf = -1

    def _retail(self, key: bytes) -> None:
        self._entries[key].cls = _class(self.history[key])

    def _relink(self, key: bytes) -> None:
        e = self._entries[key]
        self._set_leaf(key, e, self.history[key].leaf_in(self._rank))

    def inserted(self, info: BlockInfo, now: float) -> None:
        key = info.key
        if key in self._entries:
            return
        h = _arrive(self, info)
        self._clock += info.size
        h.holders = (*h.holders, self)
        e = self._entries[key] = _DEntry(info.parent, self._clock, _class(h))
        _kid_changed(self, info.parent, +1)
        self._set_leaf(key, e, h.leaf_in(self._rank))
        if self._clock >= self._due:
            self._recompute()

    def inserted_many(self, infos: Sequence[BlockInfo], now: float) -> None:
        for info in infos:
            self.inserted(info, now)

    def accessed(self, key: bytes, now: float) -> None:
        e = self._entries.get(key)
        if e is None:
            return
        self._hits[e.cls][self._bucket(e)] += 1
        h = self.history[key]
        h.hits += 1
        e.cls, e.stamp = _class(h), self._clock
        self._entries[key] = self._entries.pop(key)  # kept in stamp order

    def removed(self, key: bytes) -> None:
        e = self._entries.pop(key, None)
        if e is None:
            return
        self._ends[e.cls][self._bucket(e)] += 1
        self._set_leaf(key, e, False)
        h = self.history[key]
        h.holders = _without(h.holders, self)
        _forget(self.history, key, h)
        if key == self._last:
            self._last = None
        _kid_changed(self, e.parent, -1)

    def rank(self, key: bytes) -> tuple[float, int]:
        return self._score(key)

    def _score(self, key: bytes) -> tuple[float, int]:
        e = self._entries[key]
        return self._density[e.cls][self._bucket(e)], e.stamp

    def victims(self, leaves_only: bool = False) -> Iterator[bytes]:
        """The least dense of a random sample of leaves, again and again (each named once);
        the last few leaves in density order; then blocks with a cached child, least
        recently used first."""
        leaves, named = self._leaves, set()
        while len(named) < len(leaves) and len(leaves) > self.samples:
            best, score = None, None
            for _ in range(min(self.samples, len(leaves))):
                key = leaves[self._rng.randrange(len(leaves))]
                if key not in named and (score is None or (s := self._score(key)) < score):
                    best, score = key, s if score is not None else self._score(key)
            if best is None or len(named) > len(leaves) // 2:
                break  # the sample found none left unnamed: order what remains
            named.add(best)
            yield best
        rest = sorted((self._score(k), k) for k in leaves if k not in named)
        yield from (k for _, k in rest)
        if not leaves_only:  # the entries' own order is least recently used first
            yield from (k for k, e in self._entries.items() if e.leaf < 0)

    def keys(self) -> Iterable[bytes]:
        return self._entries.keys()

    def clock(self) -> int:
        return self._clock

    def touched_before(self, clock: int) -> Iterator[bytes]:
        return _touched_before(self._entries, clock)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(slots=True)
class HitDensityFactory(_SharedHistory):
    """One shared history for every tier it makes, as for ReuseAware."""

    samples: int = 64
    admit_tails: bool = False
    name: str = "density"
    history: dict[bytes, _History] = field(default_factory=dict)

    def make(self, tier: str, capacity_bytes: int) -> EvictionPolicy:
        return HitDensity(tier, capacity_bytes, self.history, self.samples, self.admit_tails)


POLICIES: dict[str, Callable[[], PolicyFactory]] = {
    "lru": LRUFactory,
    "reuse": ReuseAwareFactory,
    "density": HitDensityFactory,
}
DEFAULT_POLICY = "reuse"
