"""The global index: block key -> entry (state, header, replicas, leases, pins).

Kept in memory and rebuilt from the daemons' inventories; nothing here touches the
network. Per (owner, tier) an eviction policy orders the blocks there, and the index
counts every block's cached successors per tier (by parent link, whatever order blocks
arrive in), which is what makes eviction prefix-aware: a block whose successor is cached
in its tier or a faster one goes after that successor.
"""

from __future__ import annotations

import enum
import heapq
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

from kvpool.errors import BadRequest
from kvpool.keys import BlockKey
from kvpool.tiers.base import TIER_ORDER, TierKind
from master import rank_counts
from master.catalog import BlockMeta
from master.policy import BlockInfo, EvictionPolicy, LRUFactory


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
    pins: int = 0  # hard pins: never evicted while any is held
    soft_until: float = 0.0  # a soft pin: evicted after every unpinned block, until then
    # lease id -> expiry, made at the first lease (most blocks never hold one): ``leases``;
    # or, for a block taken in from a former leader's term, the expiry of the leases that
    # leader may have granted, one float every such block shares (``inherit``)
    _leases: dict[int, float] | float | None = field(default=None, repr=False)
    used_at: float = 0.0  # last write or read (monotonic), for the last tier's TTL
    meta: BlockMeta | None = None  # what the writer said of it (master.catalog)
    wanted: int = 1  # copies on distinct nodes the writer asked for (re-replicated up to it)
    scope: str = ""  # the tenant or shared namespace it belongs to (master.tenants)
    name: BlockKey | None = None  # the key its writer named, when ``key`` is a scoped one
    name_parent: BlockKey | None = None  # the parent its writer named (with ``name``)

    @property
    def leases(self) -> dict[int, float]:
        """The block's read leases (lease id -> expiry, an inherited one as lease 0);
        asking for them makes the table."""
        held = self._leases
        if type(held) is dict:
            return held
        table: dict[int, float] = {} if held is None else {0: held}  # type: ignore[dict-item]
        self._leases = table
        return table

    def inherit(self, until: float) -> None:
        """Leased until ``until``, as every block a former leader's readers may be reading:
        no table per block for it (a rebuilt index of millions would carry as many)."""
        if self._leases is None:
            self._leases = until
        else:
            self.leases[0] = until

    def drop_lease(self, lease: int) -> None:
        held = self._leases
        if type(held) is dict:
            held.pop(lease, None)

    @property
    def shown(self) -> BlockKey:
        """The key as its scope's clients know it (what their events carry)."""
        return self.key if self.name is None else self.name

    @property
    def shown_parent(self) -> BlockKey | None:
        return self.parent if self.name is None else self.name_parent

    def advance(self, to: BlockState, expect: BlockState) -> None:
        """Move to ``to`` from ``expect``; anything else is a StateError that says what was found."""
        if self.state is not expect or to not in _TRANSITIONS[expect]:
            raise StateError(f"block {self.key.hex()} is {self.state.value}; moving it to "
                             f"{to.value} expects {expect.value}")
        self.state = to

    def leased(self, now: float) -> bool:
        leases = self._leases
        if not leases:
            return False
        if type(leases) is float:
            if leases > now:
                return True
            self._leases = None
            return False
        for lease, expiry in list(leases.items()):
            if expiry <= now:
                del leases[lease]
        if not leases:
            self._leases = None  # the last one ended: no empty table per block
            return False
        return True

    def movable(self, now: float) -> bool:
        return self.state is BlockState.COMPLETE and not self.pins and not self.leased(now)

    def soft_pinned(self, now: float) -> bool:
        return self.soft_until > now

    @property
    def info(self) -> BlockInfo:
        return BlockInfo(self.key, self.size, self.parent)

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


PolicyMaker = Callable[[str, TierKind], EvictionPolicy]
_SIZES: dict[int, int] = {}  # one int object per block size, not one per entry and replica
_MAX_SIZES = 4096


def _shared(size: int) -> int:
    return _SIZES.setdefault(size, size) if len(_SIZES) < _MAX_SIZES else _SIZES.get(size, size)


class Index:
    def __init__(self, make_policy: PolicyMaker | None = None) -> None:
        self.entries: dict[BlockKey, BlockEntry] = {}
        if make_policy is None:
            lru = LRUFactory()
            make_policy = lambda owner, kind: lru.make(kind.value, 0)  # noqa: E731
        self._make_policy = make_policy
        self._tiers: dict[tuple[str, TierKind], EvictionPolicy] = {}
        # parent key -> how many of its indexed successors have their fastest replica in
        # each tier (by rank): what "a successor is cached in this tier or a faster one"
        # reads, kept as replicas come and go (a block 0 may have thousands of successors);
        # a row is packed in one int (master.rank_counts)
        self._cached: dict[BlockKey, int] = {}
        # (scope, tier) -> [bytes, replicas] of every indexed replica, pending ones too:
        # what the tenants' quotas count against.
        self.usage: dict[tuple[str, TierKind], list[int]] = {}
        # (owner, tier) -> [blocks, payload bytes, stored bytes] of the readable blocks'
        # replicas, and how many blocks are readable: what the operator's views show, kept
        # as blocks commit, gain or lose copies and go, so that no view walks the index
        self.shown: dict[tuple[str, TierKind], list[int]] = {}
        self.readable_blocks = 0
        # keys of blocks that were hard-pinned (a superset: ``pinned`` counts the live ones)
        self._pinned: set[BlockKey] = set()

    def _tally(self, entry: BlockEntry, sign: int) -> None:
        """Count an indexed block (+1) or stop counting it (-1) among its parent's cached
        successors, by its fastest replica; around every change of its replicas or link."""
        if entry.parent is None or not entry.replicas or self.entries.get(entry.key) is not entry:
            return
        rank = entry.replicas[0].tier.rank if len(entry.replicas) == 1 else \
            min(r.tier.rank for r in entry.replicas)
        row = rank_counts.bumped(self._cached.get(entry.parent, rank_counts.NONE), rank, sign)
        if row:
            self._cached[entry.parent] = row
        else:
            del self._cached[entry.parent]

    def _count(self, entry: BlockEntry, replica: Replica, sign: int) -> None:
        row = self.usage.get((entry.scope, replica.tier))
        if row is None:
            row = self.usage[(entry.scope, replica.tier)] = [0, 0]
        row[0] += sign * replica.size
        row[1] += sign

    def _show(self, entry: BlockEntry, replica: Replica, sign: int) -> None:
        row = self.shown.get((replica.node, replica.tier))
        if row is None:
            row = self.shown[(replica.node, replica.tier)] = [0, 0, 0]
        row[0] += sign
        row[1] += sign * entry.size
        row[2] += sign * replica.size
        if not row[0]:
            del self.shown[(replica.node, replica.tier)]

    def _readable(self, entry: BlockEntry, sign: int) -> None:
        """An indexed block became readable (+1) or stops being so (-1)."""
        self.readable_blocks += sign
        for r in entry.replicas:
            self._show(entry, r, sign)

    def pinned_now(self, entry: BlockEntry) -> None:
        """``entry`` took a hard pin (what ``pinned`` counts)."""
        self._pinned.add(entry.key)

    @property
    def pinned(self) -> int:
        """Indexed blocks holding a hard pin: O(blocks ever pinned), not O(index)."""
        live = {k for k in self._pinned if (e := self.entries.get(k)) is not None and e.pins > 0}
        self._pinned = live
        return len(live)

    def used(self, scope: str, tier: TierKind) -> int:
        row = self.usage.get((scope, tier))
        return row[0] if row is not None else 0

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, key: BlockKey) -> BlockEntry | None:
        return self.entries.get(key)

    def readable(self, key: BlockKey) -> BlockEntry | None:
        """The entry of a block readers may see (COMPLETE, or MOVING between tiers)."""
        entry = self.entries.get(key)
        return entry if entry is not None and entry.state.readable else None

    # exists and match over whole batches: the lookups at C speed (``map``), the state
    # compared by identity (an enum's hash and properties are Python calls): a 1000-key
    # batch costs about 50 us instead of 190.

    def present(self, keys: Sequence[BlockKey]) -> list[bool]:
        """Which of ``keys`` readers may see (``readable``)."""
        done, moving = BlockState.COMPLETE, BlockState.MOVING
        return [e is not None and (e.state is done or e.state is moving)
                for e in map(self.entries.get, keys)]

    def prefix(self, keys: Sequence[BlockKey]) -> list[BlockEntry]:
        """The entries of the leading ``keys`` readers may see, up to the first that is not."""
        done, moving = BlockState.COMPLETE, BlockState.MOVING
        out = []
        for e in map(self.entries.get, keys):
            if e is None or not (e.state is done or e.state is moving):
                break
            out.append(e)
        return out

    def policy(self, owner: str, kind: TierKind) -> EvictionPolicy:
        tier = self._tiers.get((owner, kind))
        if tier is None:
            tier = self._tiers[(owner, kind)] = self._make_policy(owner, kind)
        return tier

    def _parent_key(self, parent: BlockKey) -> BlockKey:
        """The indexed parent's own key object when there is one (one copy of the bytes)."""
        found = self.entries.get(parent)
        return found.key if found is not None else parent

    def add(self, entry: BlockEntry, now: float | None = None) -> None:
        self.add_many((entry,), time.monotonic() if now is None else now)

    def add_many(self, entries: Sequence[BlockEntry], now: float) -> None:
        """``add`` each, in order, telling each tier's policy of consecutive arrivals at
        once (``inserted_many``): what a rebuild does for every block."""
        run: list[BlockInfo] = []
        at: tuple[str, TierKind] | None = None
        for entry in entries:
            if entry.key in self.entries:
                raise BadRequest(f"block {entry.key.hex()} is already indexed")
            self.entries[entry.key] = entry
            entry.used_at = now
            entry.size = _shared(entry.size)
            for r in entry.replicas:
                r.size = _shared(r.size)
                if (r.node, r.tier) != at:
                    self._arrived(at, run, now)
                    run, at = [], (r.node, r.tier)
                run.append(entry.info)
                self._count(entry, r, 1)
            if entry.parent is not None:
                entry.parent = self._parent_key(entry.parent)
            self._tally(entry, +1)
            if entry.state.readable:
                self._readable(entry, +1)
        self._arrived(at, run, now)

    def _arrived(self, at: tuple[str, TierKind] | None, run: list[BlockInfo], now: float) -> None:
        if at is None or not run:
            return
        policy = self.policy(*at)
        if len(run) == 1:
            policy.inserted(run[0], now)
        else:
            policy.inserted_many(run, now)

    def set_parent(self, entry: BlockEntry, parent: BlockKey | None) -> None:
        """Link a block to the one it chains from (known at commit, or from its header)."""
        if parent == entry.parent:
            return
        self._tally(entry, -1)
        if parent is not None:
            parent = self._parent_key(parent)
        entry.parent = parent
        self._tally(entry, +1)

    def add_replica(self, entry: BlockEntry, replica: Replica) -> None:
        replica.size = _shared(replica.size)
        self._tally(entry, -1)
        entry.replicas.append(replica)
        self._tally(entry, +1)
        self.policy(replica.node, replica.tier).inserted(entry.info, time.monotonic())
        if self.entries.get(entry.key) is entry:
            self._count(entry, replica, 1)
            if entry.state.readable:
                self._show(entry, replica, 1)

    def drop_replica(self, entry: BlockEntry, replica: Replica) -> None:
        self._tally(entry, -1)
        entry.replicas.remove(replica)
        self._tally(entry, +1)
        self.policy(replica.node, replica.tier).removed(entry.key)
        if self.entries.get(entry.key) is entry:
            self._count(entry, replica, -1)
            if entry.state.readable:
                self._show(entry, replica, -1)

    def remove(self, entry: BlockEntry) -> None:
        """Forget an entry (it becomes REMOVED); its replica list stays as it was, for the
        caller to free."""
        was_readable = entry.state.readable
        if entry.state is not BlockState.REMOVED:
            entry.advance(BlockState.REMOVED, entry.state)
        for r in entry.replicas:
            self.policy(r.node, r.tier).removed(entry.key)
        self._tally(entry, -1)
        if self.entries.get(entry.key) is entry:
            if was_readable:
                self._readable(entry, -1)
            del self.entries[entry.key]
            for r in entry.replicas:
                self._count(entry, r, -1)

    def committed(self, entry: BlockEntry, now: float) -> None:
        """A put became readable (PENDING -> COMPLETE at ``now``, one float for the whole
        commit rather than 24 bytes a block): its policies heard of it at the reservation,
        and a write is not a read."""
        entry.used_at = now
        if self.entries.get(entry.key) is entry:
            self._readable(entry, +1)

    def touch(self, entry: BlockEntry) -> None:
        """A read: every tier holding the block hears of it."""
        now = time.monotonic()
        entry.used_at = now
        for r in entry.replicas:
            self.policy(r.node, r.tier).accessed(entry.key, now)

    @staticmethod
    def cached_above(entry: BlockEntry, tier: TierKind) -> bool:
        """Does a faster tier hold the block too? Its copy here may go whatever chains
        from it: the prefix stays cached."""
        return any(r.tier.rank < tier.rank for r in entry.replicas)

    def successor_cached(self, entry: BlockEntry, tier: TierKind) -> bool:
        """Is a block that chains from this one cached in ``tier`` or a faster one?"""
        return rank_counts.any_upto(self._cached.get(entry.key, rank_counts.NONE), tier.rank)

    def coldest(self, owner: str, tier: TierKind, now: float,
                leaves_only: bool = False) -> Iterator[BlockEntry]:
        """Blocks of (owner, tier) in the order one-at-a-time eviction would take them,
        assuming the caller takes every movable block it is given: the policy's order
        among blocks with no cached successor in this or a faster tier, where a block
        whose cached successors were all given joins at its policy rank; then soft-pinned
        ones; then those whose successors stay cached (evicted only when nothing else is
        left). ``leaves_only`` stops before those two groups."""
        policy = self.policy(owner, tier)
        soft, later = [], []
        seen: set[BlockKey] = set()  # a policy may name a key twice; a victim counts once
        waiting: dict[BlockKey, int] = {}  # parent -> its cached successors not given yet
        ready: list[tuple[object, int, BlockEntry]] = []  # parents all of whose were given
        stream = iter(policy.victims(leaves_only))
        head = next(stream, None)
        n = 0
        while True:
            if ready and (head is None or ready[0][0] <= policy.rank(head)):
                entry = heapq.heappop(ready)[2]
            elif head is not None:
                key, head = head, next(stream, None)
                entry = self.entries.get(key)
                if entry is None or key in seen:
                    continue
                if self.successor_cached(entry, tier) and waiting.get(key) != 0 \
                        and not self.cached_above(entry, tier):
                    if leaves_only:
                        head = None  # the policy names its leaves first: what is left waits
                        continue
                    later.append(entry)  # unless its successors are all given meanwhile
                    continue
                if entry.soft_pinned(now):
                    if not leaves_only:
                        soft.append(entry)
                    seen.add(key)
                    continue
            else:
                break
            if entry.key in seen:
                continue
            seen.add(entry.key)
            yield entry
            parent = self.entries.get(entry.parent) if entry.parent is not None else None
            # A block already on its way out (MOVING) leaves like one taken: its parent may
            # follow, or every chain whose end is in flight would hide its prefix.
            if parent is None or parent.key in seen or parent.replica(owner, tier) is None \
                    or not (entry.movable(now) or entry.state is BlockState.MOVING):
                continue
            left = waiting.get(parent.key)
            if left is None:
                left = rank_counts.sum_upto(self._cached.get(parent.key, rank_counts.NONE),
                                            tier.rank)
            waiting[parent.key] = left = left - 1
            if left == 0 and not parent.soft_pinned(now):
                n += 1
                heapq.heappush(ready, (policy.rank(parent.key), n, parent))
        if leaves_only:
            return
        yield from soft
        for entry in later:
            if entry.key not in seen:
                seen.add(entry.key)
                yield entry

    def chain(self, entry: BlockEntry) -> Iterator[BlockEntry]:
        """The block and every indexed block of its prefix, by parent links."""
        seen: set[BlockKey] = set()
        current: BlockEntry | None = entry
        while current is not None and current.key not in seen:
            seen.add(current.key)
            yield current
            current = self.entries.get(current.parent) if current.parent is not None else None

    def on(self, node: str) -> list[BlockEntry]:
        """The blocks with a replica owned by ``node``: O(those blocks), not O(index). The
        policies of its tiers hold their keys already (a set per node cost 53 bytes a
        block)."""
        keys: dict[BlockKey, None] = {}  # a block in two of its tiers counts once
        for (owner, _), policy in self._tiers.items():
            if owner == node:
                keys.update(dict.fromkeys(policy.keys()))
        return [e for e in map(self.entries.get, keys) if e is not None]

    def check(self) -> None:
        """Invariants the tests verify after mutations."""
        for (owner, tier), policy in self._tiers.items():
            held = {e.key for e in self.entries.values() if e.replica(owner, tier) is not None}
            assert len(policy) == len(held) and set(policy.keys()) == held, (
                f"the policy of {owner}/{tier.value} orders {len(policy)} blocks, the index has {len(held)}")
        cached: dict[BlockKey, list[int]] = {}
        for entry in self.entries.values():
            if entry.parent is not None and entry.replicas:
                row = cached.setdefault(entry.parent, [0] * len(TIER_ORDER))
                row[min(r.tier.rank for r in entry.replicas)] += 1
        assert cached == {k: rank_counts.unpacked(v) for k, v in self._cached.items()}, \
            "the counts of cached successors differ from the index's"
        usage: dict[tuple[str, TierKind], list[int]] = {}
        for entry in self.entries.values():
            for r in entry.replicas:
                row = usage.setdefault((entry.scope, r.tier), [0, 0])
                row[0] += r.size
                row[1] += 1
        counted = {k: v for k, v in self.usage.items() if v != [0, 0]}
        assert counted == usage, f"per-scope usage {counted} differs from the index's {usage}"
        shown: dict[tuple[str, TierKind], list[int]] = {}
        for entry in self.entries.values():
            if entry.state.readable:
                for r in entry.replicas:
                    row = shown.setdefault((r.node, r.tier), [0, 0, 0])
                    row[0] += 1
                    row[1] += entry.size
                    row[2] += r.size
        assert shown == self.shown, f"readable usage {self.shown} differs from the index's {shown}"
        readable = sum(e.state.readable for e in self.entries.values())
        assert readable == self.readable_blocks, \
            f"{self.readable_blocks} readable blocks counted, the index has {readable}"
        for key, entry in self.entries.items():
            assert entry.key == key
            for r in entry.replicas:
                assert (r.node, r.tier) in self._tiers, f"{key.hex()} has no policy at {r.node}/{r.tier.value}"
            assert entry.state is not BlockState.REMOVED, f"{key.hex()} is indexed but REMOVED"
            if entry.state.readable:
                assert entry.header, f"COMPLETE block {key.hex()} has no header"
