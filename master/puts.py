"""Two-phase puts: reserve arena space (PENDING), the client writes, commit (COMPLETE).

A commit has every daemon involved record its blocks before the index shows them, so a
daemon's inventory is complete at every moment and readers see COMPLETE blocks only.
A reservation nobody commits (the writer died) is reclaimed after ``put_timeout_s``.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Sequence

from kvpool.codec import BlockHeader
from kvpool.daemon_link import StoredBlock
from kvpool.errors import BadRequest, KVPoolError, NodeGone, ReservationLost, TierFull, Unavailable
from kvpool.keys import BlockKey
from kvpool.protocol import Reservation, ReserveStatus
from master.catalog import BlockMeta
from master.events import Reason
from master.index import BlockEntry, BlockState, Replica
from master.nodes import Node, TierSpace
from master.placement import arena_candidates, extra_replica_spaces
from master.state import PoolState
from master.tiering import Tiering

log = logging.getLogger(__name__)
MAX_REPLICAS = 16


class Puts:
    def __init__(self, state: PoolState, tiering: Tiering) -> None:
        self.state = state
        self.tiering = tiering

    def _new_put_id(self) -> int:
        return (self.state.term << 32) | self.state.rng.getrandbits(32)

    async def reserve(self, keys: Sequence[BlockKey], sizes: Sequence[int],
                      parents: Sequence[BlockKey | None], prefer: str | None,
                      replicas: int = 1, meta: Sequence[BlockMeta] | None = None
                      ) -> tuple[int, list[Reservation]]:
        """Reserve space for new blocks: one location per copy (``replicas`` copies on
        distinct nodes, as many as there are nodes with room); EXISTS or IN_FLIGHT for
        keys that are stored or being stored."""
        st = self.state
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
        put_id, deadline = self._new_put_id(), time.monotonic() + st.cfg.put_timeout_s
        out: list[Reservation] = []
        made: list[BlockEntry] = []
        try:
            for i, (key, size) in enumerate(zip(keys, sizes)):
                entry = st.index.get(key)
                if entry is not None:
                    status = ReserveStatus.EXISTS if entry.state.readable else ReserveStatus.IN_FLIGHT
                    out.append(Reservation(status, len(entry.replicas)))
                    continue
                node, space, offset = await self._allocate(size, prefer)
                entry = BlockEntry(key, size, BlockState.PENDING,
                                   [Replica(node.node_id, space.kind, offset, size)],
                                   put_id=put_id, deadline=deadline,
                                   parent=parents[i] if parents else None,
                                   meta=meta[i] if meta else None)
                st.index.add(entry)
                made.append(entry)
                for other, other_space in extra_replica_spaces(st.nodes.values(), node.node_id,
                                                               replicas - 1):
                    if len(entry.replicas) == replicas:
                        break
                    at = other_space.allocator.allocate(size)  # type: ignore[union-attr]
                    if at is not None:
                        st.index.add_replica(entry, Replica(other.node_id, other_space.kind, at, size))
                out.append(Reservation(ReserveStatus.NEW, len(entry.replicas),
                                       tuple(st.location(r) for r in entry.replicas)))
        except BaseException:
            for entry in made:  # roll back, then raise
                st.discard_pending(entry)
            raise
        st.counters["reserved"] += len(made)
        return put_id, out

    async def _allocate(self, size: int, prefer: str | None) -> tuple[Node, TierSpace, int]:
        nodes = self.state.nodes
        largest = max((s.capacity for _, s in arena_candidates(nodes.values())), default=0)
        if size > largest:  # no amount of demotion would make room: say so, move nothing
            raise TierFull(f"a {size}-byte block is larger than every arena (largest "
                           f"{largest} bytes); give the daemon a bigger host arena")
        idle = 0
        for _attempt in range(64):
            candidates = arena_candidates(nodes.values(), prefer)
            for node, space in candidates:
                offset = space.allocator.allocate(size)  # type: ignore[union-attr]
                if offset is not None:
                    return node, space, offset
            if not candidates or idle >= 2:
                break
            # A relief that moves nothing may have waited on another one that freed space
            # meanwhile, so only two idle rounds in a row mean there is no room.
            moved = await self.tiering.relieve(candidates[0][0], candidates[0][1].kind,
                                               need=size, at_least=size)
            idle = 0 if moved else idle + 1
        raise TierFull(f"no arena has room for a {size}-byte block and nothing more can be "
                       "demoted (blocks are leased, pinned or in flight); release leases, "
                       "unpin blocks or give the daemon a bigger host arena")

    async def commit(self, put_id: int, keys: Sequence[BlockKey], headers: Sequence[bytes]) -> int:
        """Make reserved blocks visible once their daemons have recorded them."""
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
                self.abort(put_id, keys)
                raise BadRequest(f"block {key.hex()} has no reservation under this put "
                                 "(it expired and was reclaimed, or belongs to another writer)")
            entries.append(entry)
        parents = []
        for entry, raw in zip(entries, headers):
            try:
                header, used = BlockHeader.decode(raw)
                if used != len(raw) or header.payload_size != entry.size:
                    raise BadRequest(f"header says {header.payload_size} bytes, "
                                     f"{entry.size} were reserved")
                if header.parent is not None and entry.parent not in (None, header.parent):
                    raise BadRequest("the header's parent differs from the reservation's")
            except BadRequest as exc:
                self.abort(put_id, keys)
                raise BadRequest(f"block {entry.key.hex()}: {exc}") from None
            parents.append(header.parent or entry.parent)
        hold = time.monotonic() + st.cfg.put_timeout_s
        by_node: dict[str, list[StoredBlock]] = defaultdict(list)
        for entry, raw in zip(entries, headers):
            entry.deadline = hold  # the reclaim sweep must not race the daemons' adopt
            for r in entry.replicas:
                by_node[r.node].append(StoredBlock(entry.key, r.tier, r.location, r.size, raw))
        adopted: list[tuple[str, list[StoredBlock]]] = []
        for node_id, blocks in by_node.items():
            node = st.nodes.get(node_id)
            try:
                if node is None:
                    raise Unavailable(f"node {node_id} left")
                await node.link.adopt(blocks)
                adopted.append((node_id, blocks))
            except KVPoolError as exc:
                for done_id, done in adopted:  # roll back: no daemon keeps a block nobody indexes
                    for tier in {b.tier for b in done}:
                        await st.drop_on_daemon(done_id, tier, [b.key for b in done if b.tier is tier])
                self.abort(put_id, keys)
                raise NodeGone(f"node {node_id} could not record the blocks: {exc}") from None
        committed = 0
        for entry, raw, parent in zip(entries, headers, parents):
            if entry.state is BlockState.PENDING:  # not reclaimed or dropped with its node meanwhile
                entry.advance(BlockState.COMPLETE, BlockState.PENDING)
                entry.header, entry.put_id = raw, 0
                st.index.set_parent(entry, parent)
                st.index.committed(entry)
                meta = entry.meta
                for r in entry.replicas:
                    st.events.stored([entry.key], r.node, r.tier, Reason.PUT, parent=parent,
                                     block_size=meta.block_tokens if meta else None,
                                     token_ids=meta.token_ids if meta else None)
                if meta is not None:
                    meta.token_ids = None  # prompt content: announced once, not kept
                committed += 1
        st.counters["committed"] += committed
        return committed

    def abort(self, put_id: int, keys: Sequence[BlockKey]) -> None:
        for key in keys:
            entry = self.state.index.get(key)
            if entry is not None and entry.state is BlockState.PENDING and entry.put_id == put_id:
                self.state.discard_pending(entry)

    def reclaim(self, now: float) -> int:
        """Free reservations whose writer never committed (it died mid-put)."""
        st = self.state
        stale = [e for e in st.index.entries.values()
                 if e.state is BlockState.PENDING and e.deadline <= now]
        for entry in stale:
            st.discard_pending(entry)
        if stale:
            log.info("reclaimed %d abandoned reservations", len(stale))
            st.counters["reclaimed"] += len(stale)
        return len(stale)
