"""Two-phase puts: reserve arena space (PENDING), the client writes, commit (COMPLETE).

A commit has every daemon involved record its blocks before the index shows them, so a
daemon's inventory is complete at every moment and readers see COMPLETE blocks only.
A reservation nobody commits (the writer died) is reclaimed after ``put_timeout_s``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Sequence

from kvpool.codec import BlockHeader
from kvpool.daemon_link import StoredBlock
from kvpool.errors import (BadRequest, KVPoolError, NodeGone, NotLeader, QuotaExceeded,
                           ReservationLost, TierFull, TooManyPending, Unavailable)
from kvpool.keys import BlockKey
from kvpool.protocol import Reservation, ReserveStatus
from master.catalog import BlockMeta
from kvpool.kv_events import Reason
from master.index import BlockEntry, BlockState, Replica
from master.nodes import Node, TierSpace
from master.placement import ArenaChoice, arena_candidates, extra_replica_spaces
from master.state import PoolState
from master.tenants import Scope
from master.tiering import Tiering

log = logging.getLogger(__name__)
MAX_REPLICAS = 16


@dataclass(slots=True)
class OpenPut:
    """A reservation not yet committed or aborted, counted against its client's limits."""

    owner: int | None  # the client connection (kvpool.auth.peer)
    scope: str  # the tenant or shared namespace it writes in (master.tenants)
    keys: list[BlockKey]  # the keys it reserved (the index's)
    nbytes: int  # arena bytes it holds, every replica counted
    deadline: float


class Puts:
    def __init__(self, state: PoolState, tiering: Tiering) -> None:
        self.state = state
        self.tiering = tiering
        self._open: dict[int, OpenPut] = {}
        self._by_owner: dict[int | None, list[int]] = {}  # owner -> [puts, bytes]
        self._by_scope: dict[str, int] = {}  # scope -> puts open

    def clear(self) -> None:
        """A term ended: its reservations are gone with the index."""
        self._open.clear()
        self._by_owner.clear()
        self._by_scope.clear()

    def open_in(self, scope: str) -> int:
        """Puts of a scope reserved and not yet committed."""
        return self._by_scope.get(scope, 0)

    def _admit(self, owner: int | None, nbytes: int, scope: Scope) -> None:
        """Refuse a reserve beyond its client's (or everyone's) limits on puts in flight
        and reserved bytes: typed and retryable, so a client that commits keeps working
        while one that never commits cannot fill the arenas."""
        cfg = self.state.cfg
        arenas = sum(s.capacity for _, s in arena_candidates(self.state.nodes.values()))
        cap = int(cfg.client_max_reserved * arenas)
        puts, held = self._by_owner.get(owner, (0, 0))
        if puts >= cfg.client_max_puts:
            raise TooManyPending(f"this client has {puts} puts reserved and not committed "
                                 f"(client_max_puts = {cfg.client_max_puts}); commit or abort "
                                 "some, then retry")
        if held and held + nbytes > cap:  # a lone put may be larger (the arenas decide)
            raise TooManyPending(f"this client holds {held} bytes reserved and not committed; "
                                 f"{nbytes} more would pass its limit of {cap} bytes "
                                 f"(client_max_reserved); commit or abort some, then retry")
        if scope.max_puts and self._by_scope.get(scope.name, 0) >= scope.max_puts:
            raise TooManyPending(f"tenant {scope.label!r} has {self._by_scope[scope.name]} puts "
                                 f"reserved and not committed, all its connections together "
                                 f"(its max_puts = {scope.max_puts}); commit or abort some, then retry")
        if len(self._open) >= cfg.max_puts:
            raise TooManyPending(f"{len(self._open)} puts are reserved and not committed across "
                                 f"all clients (max_puts = {cfg.max_puts}); retry shortly")

    def _opened(self, put_id: int, owner: int | None, scope: str, made: list[BlockEntry],
                deadline: float) -> None:
        nbytes = sum(r.size for e in made for r in e.replicas)
        self._open[put_id] = OpenPut(owner, scope, [e.key for e in made], nbytes, deadline)
        self._by_scope[scope] = self._by_scope.get(scope, 0) + 1
        tally = self._by_owner.setdefault(owner, [0, 0])
        tally[0] += 1
        tally[1] += nbytes

    def _closed(self, put_id: int) -> None:
        put = self._open.pop(put_id, None)
        if put is None:
            return
        left = self._by_scope.get(put.scope, 0) - 1
        if left > 0:
            self._by_scope[put.scope] = left
        else:
            self._by_scope.pop(put.scope, None)
        tally = self._by_owner[put.owner]
        tally[0] -= 1
        tally[1] -= put.nbytes
        if tally[0] <= 0:
            del self._by_owner[put.owner]

    def _recount(self, put_id: int) -> None:
        """After a commit or an abort: a put counts for the reservations it still holds
        (a commit or abort naming only some keys must not hide the others)."""
        put = self._open.get(put_id)
        if put is None:
            return
        index = self.state.index
        held = sum(r.size for k in put.keys if (e := index.get(k)) is not None
                   and e.state is BlockState.PENDING and e.put_id == put_id for r in e.replicas)
        if not held:
            self._closed(put_id)
        else:
            self._by_owner[put.owner][1] -= put.nbytes - held
            put.nbytes = held

    @property
    def open(self) -> int:
        return len(self._open)

    def _new_put_id(self) -> int:
        return (self.state.term << 32) | self.state.rng.getrandbits(32)

    async def reserve(self, keys: Sequence[BlockKey], sizes: Sequence[int],
                      parents: Sequence[BlockKey | None], prefer: str | None,
                      replicas: int = 1, meta: Sequence[BlockMeta] | None = None, *,
                      ttl_s: float | None = None, owner: int | None = None,
                      scope: Scope | None = None) -> tuple[int, list[Reservation]]:
        """Reserve space for new blocks: one location per copy (``replicas`` copies on
        distinct nodes, as many as there are nodes with room); EXISTS or IN_FLIGHT for
        keys that are stored or being stored. ``owner`` (the client's connection) is held
        to its limits, ``scope`` (its tenant's, master.tenants; the default one when None)
        to its quotas; ``keys`` and ``parents`` are as the client names them; ``ttl_s``
        shortens the time to commit below the put timeout."""
        st = self.state
        scope = scope or st.tenancy.default
        if not isinstance(replicas, int) or isinstance(replicas, bool) or not 1 <= replicas <= MAX_REPLICAS:
            raise BadRequest(f"replicas={replicas!r} is outside 1..{MAX_REPLICAS}")
        if len(keys) != len(sizes) or (parents and len(parents) != len(keys)):
            raise BadRequest("keys, sizes and parents must have the same length")
        if len(set(keys)) != len(keys):
            raise BadRequest("a batch names the same key twice")
        for size in sizes:
            if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= st.cfg.max_block_bytes:
                raise BadRequest(f"block size {size!r} is outside 1..{st.cfg.max_block_bytes} bytes")
        if not st.nodes:
            raise TierFull("no pool daemon has joined; start one with `kvpool daemon` or `kvpool up`")
        self._admit(owner, sum(sizes) * min(replicas, max(1, len(st.nodes))), scope)
        ttl = self.ttl(ttl_s)
        # Held from now while room is made; the hold the writer gets starts at the answer.
        put_id, deadline = self._new_put_id(), time.monotonic() + ttl
        out: list[Reservation] = []
        made: list[BlockEntry] = []
        arenas = ArenaChoice(st.nodes, prefer)
        try:
            for i, (name, size) in enumerate(zip(keys, sizes)):
                key = scope.key(name)
                entry = st.index.get(key)
                if entry is not None:
                    status = ReserveStatus.EXISTS if entry.state.readable else ReserveStatus.IN_FLIGHT
                    out.append(Reservation(status, len(entry.replicas)))
                    continue
                node, space, offset = await self._allocate(size, arenas, scope)
                parent = parents[i] if parents else None
                entry = BlockEntry(key, size, BlockState.PENDING,
                                   [Replica(node.node_id, space.kind, offset, size)],
                                   put_id=put_id, deadline=deadline,
                                   parent=scope.parent(parent),
                                   meta=meta[i] if meta else None, scope=scope.name,
                                   name=name if scope.hashed else None,
                                   name_parent=parent if scope.hashed else None, wanted=replicas)
                st.index.add(entry)
                made.append(entry)
                for other, other_space in extra_replica_spaces(st.nodes.values(), node.node_id,
                                                               replicas - 1):
                    if len(entry.replicas) == replicas:
                        break
                    at = other_space.allocator.allocate(  # type: ignore[union-attr]
                        size, st.tenancy.region_of(scope.name))
                    if at is not None:
                        st.index.add_replica(entry, Replica(other.node_id, other_space.kind, at, size))
                if replicas > 1:
                    arenas.refresh()  # the copies took from other arenas than the one it chose
                out.append(Reservation(ReserveStatus.NEW, len(entry.replicas),
                                       tuple(st.location(r) for r in entry.replicas)))
        except BaseException:
            for entry in made:  # roll back, then raise
                st.discard_pending(entry)
            raise
        st.counters["reserved"] += len(made)
        if made:
            # Making room may have waited on demotions: the writer's window is the whole ttl
            # from this answer, as it counts it, not what is left of it.
            deadline = time.monotonic() + ttl
            for entry in made:
                entry.deadline = deadline
            self._opened(put_id, owner, scope.name, made, deadline)
        return put_id, out

    async def _allocate(self, size: int, arenas: ArenaChoice,
                        scope: Scope) -> tuple[Node, TierSpace, int]:
        """Arena space for one block, within its scope's quota of the tier it lands in:
        over it, the scope's own coldest blocks there are demoted first (as a full tier
        demotes everyone's); if they cannot make room, QuotaExceeded."""
        for _attempt in range(3):
            node, space, offset = await self._place(size, arenas, scope)
            quota = scope.quotas.get(space.kind, 0)
            if not quota:
                return node, space, offset
            used = self.state.index.used(scope.name, space.kind)
            if used + size <= quota:
                return node, space, offset
            space.allocator.free(offset)  # type: ignore[union-attr]
            if size > quota or not await self.tiering.make_room_in(scope.name, space.kind,
                                                                   used + size - quota):
                break
            arenas.refresh()
        self.state.counters["quota_refused"] += 1
        raise QuotaExceeded(f"tenant {scope.label!r} holds {used} bytes in the {space.kind.value} "
                            f"tier; a {size}-byte block would pass its quota of {quota} bytes, and "
                            "none of its blocks there can be moved (leased, pinned or in flight); "
                            "release or remove some of its blocks, or raise its quota_bytes")

    async def _place(self, size: int, arenas: ArenaChoice,
                     scope: Scope) -> tuple[Node, TierSpace, int]:
        """Space in an arena, inside the arena region of ``scope`` (master.regions): when it
        is full, blocks of that region are demoted (never another tenant's)."""
        region = self.state.tenancy.region_of(scope.name)
        largest = arenas.largest(region)
        if size > largest:  # no amount of demotion would make room: say so, move nothing
            raise TierFull(f"a {size}-byte block is larger than every arena region it may use "
                           f"(largest {largest} bytes); give the daemon a bigger host arena"
                           + (f" or tenant {region!r} a bigger arena_share" if region else ""))
        idle = 0
        for _attempt in range(64):
            placed = arenas.allocate(size, region)
            if placed is not None:
                return placed
            best = arenas.best
            if best is None or idle >= 2:
                break
            # Demote just enough for this block (never wait on a whole relief of others);
            # only two idle rounds in a row mean there is no room.
            moved = await self.tiering.make_room(best[0], best[1].kind, size, region)
            arenas.refresh()
            idle = 0 if moved else idle + 1
        raise TierFull(f"no arena has room for a {size}-byte block and nothing more can be "
                       "demoted (blocks are leased, pinned or in flight); release leases, "
                       "unpin blocks or give the daemon a bigger host arena")

    def ttl(self, asked: float | None) -> float:
        """How long a reservation holds: what its writer asked, at most the put timeout."""
        timeout = self.state.cfg.put_timeout_s
        return timeout if asked is None else min(asked, timeout)

    async def commit(self, put_id: int, keys: Sequence[BlockKey], headers: Sequence[bytes],
                     scope: Scope | None = None) -> int:
        """Make reserved blocks visible once their daemons have recorded them (``keys`` as
        ``scope``'s client names them). The put stops counting against its client's limits
        whatever the outcome."""
        scope = scope or self.state.tenancy.default
        try:
            return await self._commit(put_id, scope.keys(keys), headers, scope)
        finally:
            self._recount(put_id)

    async def _commit(self, put_id: int, keys: Sequence[BlockKey], headers: Sequence[bytes],
                      scope: Scope) -> int:
        st = self.state
        if len(keys) != len(headers):
            raise BadRequest("commit needs one header per key")
        if put_id >> 32 != st.term:
            raise ReservationLost("this put was reserved by a master that is no longer leader; "
                                  "its reservation is gone, put again")
        entries = []
        for key in keys:
            entry = st.index.get(key)
            if entry is None or entry.state is not BlockState.PENDING or entry.put_id != put_id:
                # Its deadline passed and the sweep reclaimed it (all of the put or, with the
                # sweep between its entries, part of it; another writer may hold the key
                # since): retryable, as the writer only has to put again.
                self.abort(put_id, keys)
                raise ReservationLost(f"block {key.hex()} of put {put_id & 0xFFFFFFFF} has no "
                                      "reservation any more (it outlived its deadline and was "
                                      "reclaimed); put again")
            entries.append(entry)
        parents, stored = [], []
        for entry, raw in zip(entries, headers):
            try:
                header, used = BlockHeader.decode(raw)
                if used != len(raw) or header.payload_size != entry.size:
                    raise BadRequest(f"header says {header.payload_size} bytes, "
                                     f"{entry.size} were reserved")
                named = scope.parent(header.parent)
                if named is not None and entry.parent not in (None, named):
                    raise BadRequest("the header's parent differs from the reservation's")
            except BadRequest as exc:
                self.abort(put_id, keys)
                raise BadRequest(f"block {entry.shown.hex()}: {exc}") from None
            parents.append(named or entry.parent)
            if entry.name is not None and header.parent is not None:
                entry.name_parent = header.parent
            # The header the pool keeps says what the index says: the parent's index key and
            # the scope the master gave the put (whatever the writer wrote there), so that an
            # index rebuilt from the daemons' inventories has both back.
            if header.parent == parents[-1] and header.scope == scope.name:
                stored.append(raw)  # the writer's header says so already
            else:
                stored.append(dataclasses.replace(header, parent=parents[-1],
                                                  scope=scope.name).encode())
        hold = time.monotonic() + st.cfg.put_timeout_s
        by_node: dict[str, list[StoredBlock]] = defaultdict(list)
        for entry, raw in zip(entries, stored):
            entry.deadline = hold  # the reclaim sweep must not race the daemons' adopt
            for r in entry.replicas:
                by_node[r.node].append(StoredBlock(entry.key, r.tier, r.location, r.size, raw))
        epoch = st.epoch
        if not await st.leading(epoch):
            raise ReservationLost("this master's term ended while the put was committed; "
                                  "its reservation is gone, put again")
        nodes = {node_id: st.nodes.get(node_id) for node_id in by_node}

        async def record(node_id: str, blocks: list[StoredBlock]) -> None:
            node = nodes[node_id]
            if node is None:
                raise Unavailable(f"node {node_id} left")
            await node.link.adopt(blocks)

        # Every node records its copies at once: a put with two replicas waits for one
        # round trip, not two in a row.
        outcomes = await asyncio.gather(*(record(n, b) for n, b in by_node.items()),
                                        return_exceptions=True)
        failed = [(n, b, exc) for (n, b), exc in zip(by_node.items(), outcomes)
                  if isinstance(exc, BaseException)]
        for _, _, exc in failed:
            if not isinstance(exc, KVPoolError):
                raise exc
        if failed:
            if not st.current(epoch):  # the next term's nodes and index are not this put's
                raise ReservationLost("this master's term ended while the put was committed; "
                                      "its reservation is gone, put again")
            # Roll back: no daemon keeps a block nobody indexes (one that failed may have
            # recorded them too, unless it refused them).
            undo = [(n, b) for (n, b), exc in zip(by_node.items(), outcomes) if exc is None]
            for node_id, blocks, exc in failed:
                if isinstance(exc, BadRequest):
                    st.diverged(node_id, exc)  # records the index lacks may be in the way
                elif nodes[node_id] is not None and not isinstance(exc, NotLeader):
                    undo.append((node_id, blocks))  # (a fenced node refused them all)
            for done_id, done in undo:
                for tier in {b.tier for b in done}:
                    if st.current(epoch):
                        await st.drop_on_daemon(done_id, tier, [b.key for b in done if b.tier is tier])
            self.abort(put_id, keys)
            for fenced_id, _, fenced in failed:
                if isinstance(fenced, NotLeader):  # a newer leader has been to that daemon
                    raise NotLeader(f"node {fenced_id} refused this master's commit: {fenced}") from None
            node_id, _, exc = failed[0]
            raise NodeGone(f"node {node_id} could not record the blocks: {exc}") from None
        if not await st.leading(epoch):
            raise ReservationLost("this master's term ended while the put was committed; its "
                                  "reservation is gone, put again")
        done: list[BlockEntry] = []
        now = time.monotonic()
        for entry, raw, parent in zip(entries, stored, parents):
            if entry.state is BlockState.PENDING:  # not reclaimed or dropped with its node meanwhile
                entry.advance(BlockState.COMPLETE, BlockState.PENDING)
                entry.header, entry.put_id = raw, 0
                st.index.set_parent(entry, parent)
                st.index.committed(entry, now)
                if entry.wanted > 1 and len({r.node for r in entry.replicas}) < entry.wanted:
                    st.short.add(entry.key)  # fewer copies than asked (no room then): more come
                done.append(entry)
        st.announce(((r.node, r.tier, e) for e in done for r in e.replicas), Reason.PUT)
        for entry in done:
            if entry.meta is not None:
                entry.meta.token_ids = None  # prompt content: announced once, not kept
        st.counters["committed"] += len(done)
        return len(done)

    def abort(self, put_id: int, keys: Sequence[BlockKey]) -> None:
        for key in keys:
            entry = self.state.index.get(key)
            if entry is not None and entry.state is BlockState.PENDING and entry.put_id == put_id:
                self.state.discard_pending(entry)
        self._recount(put_id)

    def reclaim(self, now: float) -> int:
        """Free reservations whose writer never committed (it died mid-put). Only the
        open puts are looked at, never the whole index: every PENDING entry belongs to one
        (a commit in flight holds its entries past the put's deadline, and the put with them)."""
        st = self.state
        stale = []
        for put_id, put in [(p, put) for p, put in self._open.items() if put.deadline <= now]:
            held = 0.0
            for key in put.keys:
                entry = st.index.get(key)
                if entry is None or entry.state is not BlockState.PENDING or entry.put_id != put_id:
                    continue
                if entry.deadline <= now:
                    stale.append(entry)
                else:
                    held = max(held, entry.deadline)
            if held:
                put.deadline = held
            else:
                self._closed(put_id)
        for entry in stale:
            st.discard_pending(entry)
        if stale:
            log.info("reclaimed %d abandoned reservations", len(stale))
            st.counters["reclaimed"] += len(stale)
        return len(stale)
