"""Tiering: watermarks, demotion one tier down, eviction at the last tier, and
promotion of cold blocks into a host arena when they are read.

Each tier keeps between its own watermarks. Eviction order is the index's: the policy's
order (master/policy.py) among blocks with no cached successor, soft-pinned blocks
after every other, the blocks a cached successor chains from last. The policy also
decides which demoted blocks a slower tier admits; the others are evicted. A move copies
first, switches the index, then frees the source, so a block is readable all the way
through; leased and hard-pinned blocks never move. The last tier also drops blocks
unread for ``last_tier_ttl_s``, looking only at those (``_expire``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import defaultdict, deque
from contextlib import suppress

from kvpool.errors import ArenaBusy, BadRequest, BlockNotFound, ChecksumMismatch, KVPoolError, NodeGone, TierFull
from kvpool.keys import BlockKey
from kvpool.tiers.base import TierKind
from kvpool.kv_events import Reason
from master.index import BlockEntry, BlockState, Replica
from master.nodes import Node
from master.placement import pressured, relief_target
from master.state import PoolState

log = logging.getLogger(__name__)
DEMOTE_BATCH = 64  # blocks per copy call to a daemon
# After a copy call whose outcome is unknown (its link broke or timed out), how long the
# arena space it may still write stays out of use: past the link's own timeout.
COPY_SETTLE_S = 32.0
MOVE_WAIT_S = 5.0  # the longest a promotion waits for another move of its block to end
ROOM_BATCH = 32  # callers' worth of room one make_room walk frees (within the watermark gap)


class Tiering:
    def __init__(self, state: PoolState) -> None:
        self.state = state
        self._relieving: dict[tuple[str, TierKind], asyncio.Lock] = defaultdict(asyncio.Lock)
        self._leaving: dict[tuple[str, TierKind], int] = defaultdict(int)  # blocks being demoted
        # (owner, tier, region) -> make_room batch in flight -> the bytes it frees that no
        # caller has claimed yet
        self._coming: dict[tuple[str, TierKind, str | None], dict[int, int]] = defaultdict(dict)
        self._batch = itertools.count()
        self._incoming: dict[tuple[str, TierKind], int] = defaultdict(int)  # bytes being copied into a cold tier
        self._landed = asyncio.Condition()  # notified whenever a demotion batch is done
        # (owner, last tier) -> (monotonic time, the tier's policy clock) at each TTL sweep
        self._clocks: dict[tuple[str, TierKind], deque[tuple[float, int]]] = {}

    def clear(self) -> None:
        self._relieving.clear()
        self._leaving.clear()
        self._coming.clear()
        self._incoming.clear()
        self._clocks.clear()

    def high(self, kind: TierKind) -> float:
        return self.state.cfg.watermarks(kind.value)[0]

    async def sweep(self) -> None:
        """Bring every tier above its high watermark down to its low one, fastest first;
        drop what outlived the last tier's TTL."""
        for node, kind in pressured(list(self.state.nodes.values()), self.high):
            await self.relieve(node, kind)
        await self._hold_quotas()
        if self.state.cfg.last_tier_ttl_s > 0:
            await self._expire(time.monotonic() - self.state.cfg.last_tier_ttl_s)

    async def _expire(self, before: float) -> None:
        """Drop the last tiers' blocks unread since ``before``. Each tier's policy keeps its
        blocks in the order they were last written or read there, and each sweep notes the
        tier's clock: only the blocks touched before the last note older than ``before``
        are looked at, so a sweep costs the blocks it expires (and the leased or pinned
        ones it must leave), not the tier. A block that came down after its last read
        goes one TTL after it came."""
        st = self.state
        now = time.monotonic()
        lasts = {}
        for node in list(st.nodes.values()):
            last = max(node.tiers, key=lambda k: k.rank)
            lasts[(st.owner(node, last), last)] = node
        self._clocks = {at: self._clocks.get(at, deque()) for at in lasts}  # the nodes gone: none
        for (owner, last), node in lasts.items():
            policy, notes = st.index.policy(owner, last), self._clocks[(owner, last)]
            notes.append((now, policy.clock()))
            while len(notes) > 1 and notes[1][0] <= before:
                notes.popleft()
            if notes[0][0] > before:
                continue  # nothing here was touched that long ago
            entries = st.index.entries
            stale = [e for key in policy.touched_before(notes[0][1])
                     if (e := entries.get(key)) is not None and e.used_at < before
                     and e.movable(now) and len(e.replicas) == 1]
            if stale:
                await self.demote(node, last, stale)
                st.counters["expired"] += len(stale)

    async def relieve(self, node: Node, kind: TierKind, need: int = 0) -> bool:
        """Demote (or, at the last tier, evict) the coldest movable blocks of one tier until
        it is below its low watermark (and ``need`` bytes fit). True when anything moved."""
        st = self.state
        owner = st.owner(node, kind)
        async with self._relieving[(owner, kind)]:
            space = node.tiers.get(kind)
            if space is None or st.nodes.get(node.node_id) is not node:
                return False
            target = relief_target(space, st.cfg.watermarks(kind.value)[1], need)
            moved, leaves_only = False, True
            while space.used > target:
                # In rounds: evicting a chain's last block makes the one before it a leaf,
                # which the next round may take. Blocks whose successors stay cached (or
                # soft-pinned ones) go only when no leaf can.
                now, before = time.monotonic(), space.used
                victims, freed = [], 0
                for entry in st.index.coldest(owner, kind, now, leaves_only):
                    if space.used - freed <= target:
                        break
                    if entry.movable(now):
                        victims.append(entry)
                        freed += entry.replica(owner, kind).size  # type: ignore[union-attr]
                if not victims:
                    if not leaves_only:
                        break
                    leaves_only = False
                    continue
                await self.demote(node, kind, victims)
                moved = True
                if space.used >= before:
                    break  # nothing left the tier (copies failed): try again at the next sweep
            return moved

    async def make_room(self, node: Node, kind: TierKind, size: int, region: str | None = None) -> bool:
        """Free about ``size`` bytes of one tier for a caller waiting on them (a put, a
        promotion), rather than wait on a relief of a whole watermark's worth of other
        blocks that is in flight (that wait was the multi-second stall of puts under load;
        the sweep brings the tier down to its low watermark meanwhile). Only in the arena
        ``region`` when named (master.regions).

        Room is made in batches: one walk of the eviction order demotes enough for the
        next ``ROOM_BATCH`` callers, or as much again as is in flight (within the tier's
        watermark gap), and the callers that follow claim that room in flight and wait for
        it to land instead of walking again. One walk per block stepped over every block
        already in flight each time, so its cost grew with the tier (and starved the
        master's loop until the daemon's lease expired). When every candidate is already
        moving, wait for the next batch to land instead. True when room was made or is
        coming."""
        st = self.state
        owner = st.owner(node, kind)
        space = node.tiers.get(kind)
        if space is None or st.nodes.get(node.node_id) is not node:
            return False
        batches = self._coming[(owner, kind, region)]
        for batch, spare in batches.items():
            if spare >= size:  # a batch in flight frees this much more than its caller needs
                batches[batch] = spare - size
                st.counters[f"room_awaited_{kind.value}"] += 1
                await self._await_landing()
                return True
        alloc = space.allocator
        high, low = st.cfg.watermarks(kind.value)
        room = alloc.region(region).size if region is not None and alloc is not None else space.capacity
        # As much again as is in flight, when callers outrun the batches: the walks (each
        # steps over what is in flight) then stay a few per watermark gap.
        most = max(ROOM_BATCH, self._leaving[(owner, kind)]) * size
        want = max(size, min(most, int((high - low) * room)))
        now = time.monotonic()
        victims, freed = [], 0
        for entry in st.index.coldest(owner, kind, now):
            if freed >= want:
                break
            replica = entry.replica(owner, kind)
            if replica is None or not entry.movable(now):
                continue
            if region is not None and alloc is not None and \
                    alloc.region_at(replica.location).name != alloc.region(region).name:
                continue
            victims.append(entry)
            freed += replica.size
        if victims:
            st.counters[f"room_made_{kind.value}"] += 1
            batch = next(self._batch)
            batches[batch] = freed - size
            try:
                await self.demote(node, kind, victims)
            finally:
                batches.pop(batch, None)
            return True
        if not self._leaving[(owner, kind)]:
            return False
        st.counters[f"room_awaited_{kind.value}"] += 1
        await self._await_landing()
        return True

    async def _await_landing(self) -> None:
        """Until the next demotion batch lands (a second at most)."""
        async with self._landed:
            with suppress(TimeoutError):
                await asyncio.wait_for(self._landed.wait(), timeout=1.0)

    async def _hold_quotas(self) -> None:
        """Reads may promote a tenant's blocks past its quota of an arena tier (a read is
        never refused): the sweep demotes its coldest ones back under it."""
        st = self.state
        for scope in st.tenancy.scopes.values():
            for kind, quota in scope.quotas.items():
                over = st.index.used(scope.name, kind) - quota
                if over > 0 and kind.is_arena:
                    await self.make_room_in(scope.name, kind, over)

    async def make_room_in(self, scope: str, kind: TierKind, need: int) -> bool:
        """Bring one scope's bytes in a tier down by ``need`` (its quota is reached): demote
        its own coldest movable blocks there, node by node, in eviction order. True when
        enough left."""
        st = self.state
        freed = 0
        for node in list(st.nodes.values()):
            if kind not in node.tiers:
                continue
            owner, now = st.owner(node, kind), time.monotonic()
            victims, here = [], 0
            for entry in st.index.coldest(owner, kind, now):
                if freed + here >= need:
                    break
                if entry.scope == scope and entry.movable(now):
                    victims.append(entry)
                    here += entry.replica(owner, kind).size  # type: ignore[union-attr]
            if victims:
                before = st.index.used(scope, kind)
                await self.demote(node, kind, victims)
                freed += max(0, before - st.index.used(scope, kind))
                st.counters[f"quota_demoted_{kind.value}"] += len(victims)
            if freed >= need:
                return True
        return freed >= need

    def over_quota(self, entry: BlockEntry, dst: TierKind, coming: dict[str, int]) -> bool:
        """Would a copy of the block in ``dst`` pass its scope's quota there (with the
        ``coming`` bytes of this batch)? Then it is evicted instead of demoted, as a block
        the policy does not admit is."""
        scope = self.state.tenancy.scopes.get(entry.scope)
        quota = scope.quotas.get(dst, 0) if scope is not None else 0
        if not quota:
            return False
        after = self.state.index.used(entry.scope, dst) + coming.get(entry.scope, 0) + entry.size
        if after > quota:
            return True
        coming[entry.scope] = coming.get(entry.scope, 0) + entry.size
        return False

    async def demote(self, node: Node, kind: TierKind, entries: list[BlockEntry]) -> None:
        """Move blocks one tier down on their node; at the last tier, evict them."""
        dst = node.below(kind)
        leaving = (self.state.owner(node, kind), kind)
        epoch = self.state.epoch
        for start in range(0, len(entries), DEMOTE_BATCH):
            if not self.state.current(epoch) or self.state.nodes.get(node.node_id) is not node:
                return  # the term ended, or the node left, since the last batch
            chunk = [e for e in entries[start:start + DEMOTE_BATCH] if e.state is BlockState.COMPLETE]
            for e in chunk:
                e.advance(BlockState.MOVING, BlockState.COMPLETE)
            self._leaving[leaving] += len(chunk)
            try:
                moved = chunk if dst is None else await self._copy_down(node, kind, dst, chunk)
                if self.state.current(epoch):  # else the new term's index has these blocks
                    await self._drop_replicas(node, kind, moved)
            finally:
                self._leaving[leaving] -= len(chunk)
                for e in chunk:
                    if e.state is BlockState.MOVING:
                        e.advance(BlockState.COMPLETE, BlockState.MOVING)
                async with self._landed:
                    self._landed.notify_all()

    async def _copy_down(self, node: Node, src: TierKind, dst: TierKind,
                         entries: list[BlockEntry]) -> list[BlockEntry]:
        """Copy to ``dst`` the blocks that have no replica at ``dst`` or below yet; returns
        the blocks that now have one."""
        st = self.state
        dst_owner = st.owner(node, dst)
        now = time.monotonic()
        admits = st.index.policy(dst_owner, dst)
        need, done = [], []
        coming: dict[str, int] = {}
        for e in entries:
            if any(r.node in (node.node_id, dst_owner) and r.tier.rank >= dst.rank for r in e.replicas):
                done.append(e)  # already below
            elif e.wanted <= 1 and not admits.admit(e.info, now):
                # Evicted instead of demoted: the policy expects no reuse worth the copy. Not
                # a copy of a replicated block: its writer asked for that many, and one
                # evicted here leaves the block one node failure from lost.
                st.counters[f"not_admitted_{dst.value}"] += 1
                done.append(e)
            elif self.over_quota(e, dst, coming):
                st.counters[f"quota_evicted_{dst.value}"] += 1
                done.append(e)
            else:
                need.append(e)
        if not need:
            return done
        dst_space = node.tiers[dst]
        estimate = sum(e.size for e in need)
        epoch = st.epoch
        # A cold tier counts a copy only once it lands: the bytes of every copy in flight
        # into it count here too, or demotions that each saw room at once overfill it
        # (and each copy past its capacity fails, leaving the faster tier full).
        incoming = (dst_owner, dst) if dst_space.allocator is None else None
        if incoming is not None:
            self._incoming[incoming] += estimate
        pending = self._incoming[incoming] if incoming is not None else estimate
        try:
            if dst_space.used + pending > self.high(dst) * dst_space.capacity:
                await self.relieve(node, dst, need=pending)
                if not st.current(epoch) or st.nodes.get(node.node_id) is not node:
                    return []
            locations = [0] * len(need)
            if dst_space.allocator is not None:  # an arena destination: its space is reserved first
                placed = [(e, dst_space.allocator.allocate(e.size, st.region(e))) for e in need]
                for e, at in placed:
                    if at is None:
                        log.warning("no room in %s/%s to demote %s into", node.node_id, dst.value, e.key.hex())
                need = [e for e, at in placed if at is not None]
                locations = [at for _, at in placed if at is not None]
            try:
                results = await node.link.copy([e.key for e in need], src, dst, locations)
            except KVPoolError as exc:
                log.warning("demotion %s->%s on %s failed: %s", src.value, dst.value, node.node_id, exc)
                if st.current(epoch):  # the daemon may still copy: the space is reused later
                    st.free_later(node, dst, [(e.key, at, e.size) for e, at in zip(need, locations)],
                                  COPY_SETTLE_S)
                return done
            if not st.current(epoch):  # the next term took the copies in from the inventory, or not
                return []
            for entry, at, res in zip(need, locations, results):
                if entry.state is BlockState.REMOVED:
                    if res.ok:  # removed meanwhile: the copy goes before its space is reused
                        await st.drop_on_daemon(dst_owner, dst, [entry.key])
                    if dst_space.allocator is not None:
                        dst_space.allocator.free(at)
                elif res.ok:
                    if dst_space.allocator is None:
                        dst_space.take(at, res.size)
                    st.index.add_replica(entry, Replica(dst_owner, dst, at, res.size))
                    st.events.stored([entry.shown], dst_owner, dst, Reason.DEMOTED,
                                     parent=entry.shown_parent, scope=entry.scope)
                    done.append(entry)
                else:
                    if dst_space.allocator is not None:
                        dst_space.allocator.free(at)
                    self._failed(entry, entry.replica(node.node_id, src), dst, res.error)
            st.counters[f"demoted_{src.value}"] += len(need)
            return done
        finally:
            if incoming is not None and st.current(epoch):  # (a new term starts from none)
                self._incoming[incoming] -= estimate

    def _failed(self, entry: BlockEntry, source: Replica | None, dst: TierKind,
                error: KVPoolError | None) -> None:
        """A copy of one block did not happen: a bad or vanished source replica is lost;
        a full destination leaves the block where it is."""
        if isinstance(error, (ChecksumMismatch, BlockNotFound)):
            if source is not None and source in entry.replicas:
                self.state.lose_replica(entry, source, error)
        else:
            log.warning("cannot copy %s to %s: %s", entry.key.hex(), dst.value, error)
            self.state.counters[f"move_failed_{dst.value}"] += 1

    async def _drop_replicas(self, node: Node, kind: TierKind, entries: list[BlockEntry]) -> None:
        """Forget the ``kind`` replica of blocks nobody is reading; evict lone ones. They
        leave the index before the daemon is told (PoolState.retire): a get arriving while
        the daemon drops them must not be granted bytes whose space is about to be reused."""
        st = self.state
        now = time.monotonic()
        owner = st.owner(node, kind)
        drop = [(e, r) for e in entries if e.state is not BlockState.REMOVED and not e.leased(now)
                and not e.pins and (r := e.replica(owner, kind)) is not None]
        if not drop:
            return
        gone = {id(e) for e, r in drop if e.replicas == [r]}  # its last replica: evicted
        for entry, _ in drop:
            if id(entry) in gone:
                st.index.remove(entry)
        if not await st.retire(owner, kind, drop):
            return  # the term ended meanwhile
        for entry, _ in drop:
            st.events.removed([entry.shown], owner, kind,
                              Reason.EVICTED if id(entry) in gone else Reason.DEMOTED, scope=entry.scope)
        st.counters["evicted"] += len(gone)

    async def promote(self, key: BlockKey) -> Replica | None:
        """Copy a cold block into its node's host arena (the checksum is verified on the
        way); the block's fastest replica, or None when it is not stored (any more). A block
        still stored that cannot be read now raises a typed error saying why (ArenaBusy,
        NodeGone, the copy's own); a cold copy found bad is dropped and the next is tried."""
        st = self.state
        for _attempt in range(4):
            entry = st.index.readable(key)
            if entry is None:
                return None
            waited = time.monotonic() + MOVE_WAIT_S
            while entry.state is BlockState.MOVING:
                if time.monotonic() > waited:
                    raise ArenaBusy(f"block {key.hex()} is being moved between tiers; retry")
                await asyncio.sleep(0.002)
            if entry.state is not BlockState.COMPLETE:
                return None
            best = entry.best()
            if best is None or best.tier.is_arena:
                return best
            replica = await self._promote(entry, best)
            if replica is not None or best in entry.replicas:
                return replica
        return None

    async def _promote(self, entry: BlockEntry, best: Replica) -> Replica | None:
        """One try from the cold replica ``best``: the new host replica, or None when the
        block was removed meanwhile or ``best`` turned out bad (and left the index)."""
        st, key = self.state, entry.key
        node = st.node_for(best.node)
        if node is None:
            raise NodeGone(f"no live node reads {best.node}'s {best.tier.value} tier now")
        space = node.tiers.get(TierKind.HOST)
        if space is None or space.allocator is None:
            raise TierFull(f"node {node.node_id} has no host arena to promote into")
        entry.advance(BlockState.MOVING, BlockState.COMPLETE)
        epoch = st.epoch
        try:
            region = st.region(entry)
            offset = space.allocator.allocate(entry.size, region)
            for _attempt in range(8):
                if offset is not None or not await self.make_room(node, TierKind.HOST,
                                                                  entry.size, region):
                    break
                offset = space.allocator.allocate(entry.size, region)
            if not st.current(epoch) or st.nodes.get(node.node_id) is not node:
                if offset is not None and st.current(epoch):
                    space.allocator.free(offset)
                raise NodeGone(f"node {node.node_id} left the pool during the promotion")
            if offset is None:
                raise ArenaBusy(f"block {key.hex()} is stored in {best.tier.value} but cannot be "
                                f"promoted now: node {node.node_id}'s host arena is full of "
                                "blocks being read or pinned; retry")
            try:
                [res] = await node.link.copy([key], best.tier, TierKind.HOST, [offset])
            except BadRequest as exc:  # refused (an overlap): records the index lacks
                if st.current(epoch):
                    st.diverged(node.node_id, exc)
                    space.allocator.free(offset)
                raise
            except BaseException:  # the daemon may still copy (frozen with the call in hand)
                if st.current(epoch):
                    st.free_later(node, TierKind.HOST, [(key, offset, entry.size)], COPY_SETTLE_S)
                raise
            if not st.current(epoch):
                raise NodeGone(f"the master's term ended during the promotion of {key.hex()}")
            if not res.ok or entry.state is BlockState.REMOVED:
                if res.ok:  # removed meanwhile: the copy goes before its space is reused
                    await st.drop_on_daemon(node.node_id, TierKind.HOST, [key])
                space.allocator.free(offset)
                if not res.ok and entry.state is not BlockState.REMOVED:
                    if isinstance(res.error, TierFull):  # room the index saw, the daemon not
                        st.diverged(node.node_id, res.error)
                    self._failed(entry, best, TierKind.HOST, res.error)
                    if best in entry.replicas:  # still good where it is: why it is unreadable
                        raise res.error or TierFull(f"block {key.hex()} could not be promoted")
                return None
            replica = Replica(node.node_id, TierKind.HOST, offset, entry.size)
            st.index.add_replica(entry, replica)
            st.events.stored([entry.shown], node.node_id, TierKind.HOST, Reason.PROMOTED,
                             parent=entry.shown_parent, scope=entry.scope)
            st.counters["promoted"] += 1
            return replica
        finally:
            if entry.state is BlockState.MOVING:
                entry.advance(BlockState.COMPLETE, BlockState.MOVING)
