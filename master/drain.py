"""Draining a node: it takes no new blocks, its blocks in every tier move to other nodes'
arenas or to the shared object tier, readers that hold leases on its replicas finish,
and then it says it can be stopped.

A drain runs in passes until the node holds nothing the index knows of. Each pass copies
the blocks that have no replica off the node (the node's daemon reads them, verifying a
cold tier's checksum, and writes them into space the master allocated in another node's
arena, or copies them into the shared object tier it names), then forgets the node's
replicas of blocks that have a copy elsewhere. A copy lands before the source goes, so a
block is readable all the way through; once a copy exists, new reads are sent to it
(PoolState.best), and the node's replica is forgotten only when every lease taken before
the copy landed has ended. Puts in flight into the node are waited for (they commit or
are reclaimed). A drain that passes its deadline with blocks left is STUCK and says why;
running it again resumes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict

from kvpool.errors import BadRequest, BlockNotFound, ChecksumMismatch, KVPoolError, NodeNotFound
from kvpool.keys import BlockKey
from kvpool.tasks import TaskOwner
from kvpool.tiers.base import TierKind
from kvpool.kv_events import Reason
from master.copies import send_copies
from master.index import BlockEntry, BlockState, Replica
from master.membership import Membership
from master.nodes import Node, NodeState, TierSpace
from master.placement import arena_candidates
from master.state import PoolState
from master.tiering import Tiering

log = logging.getLogger(__name__)
BATCH = 64  # blocks per send or copy call
PAUSE_S = 0.1  # between passes that are waiting for leases or puts, doubling ...
MAX_PAUSE_S = 2.0  # ... up to this


class Drains:
    def __init__(self, state: PoolState, tiering: Tiering, members: Membership) -> None:
        self.state = state
        self.tiering = tiering
        self.members = members
        self._tasks = TaskOwner("drain")
        self._running: dict[str, asyncio.Task[None]] = {}
        # block -> leases that may read the draining node's replica (taken before a copy
        # elsewhere existed); the replica goes when all of them have ended
        self._before: dict[BlockKey, set[int]] = {}

    def node(self, node_id: str) -> Node:
        node = self.state.nodes.get(node_id)
        if node is None:
            known = ", ".join(sorted(self.state.nodes)) or "none"
            raise NodeNotFound(f"no node {node_id!r} is in the pool (nodes: {known})")
        return node

    def start(self, node_id: str, timeout_s: float) -> Node:
        """Begin (or resume) draining a node; returns at once, the drain runs on."""
        if not 0 < timeout_s <= 86_400:
            raise BadRequest(f"timeout_s={timeout_s!r}: give a drain deadline in (0, 86400] seconds")
        node = self.node(node_id)
        if node.state is NodeState.DRAINING:
            return node
        others = [n for n in self.state.nodes.values() if n is not node and n.state.accepts]
        store = node.tiers.get(TierKind.OBJECT)
        if not others and not (store is not None and store.store):
            raise BadRequest(f"node {node_id} is the only active node and names no shared object "
                             "tier: its blocks have nowhere to go; start another daemon first")
        node.become(NodeState.DRAINING)
        node.drain.started, node.drain.finished, node.drain.note = time.time(), 0.0, ""
        log.info("draining node %s (deadline %.0fs)", node_id, timeout_s)
        self._running[node_id] = self._tasks.spawn(self._run(node, timeout_s), name=f"drain-{node_id}")
        return node

    async def undrain(self, node_id: str) -> Node:
        """Stop a drain (what moved stays moved); the node takes new blocks again."""
        node = self.node(node_id)
        task = self._running.pop(node_id, None)
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if node.state is not NodeState.ACTIVE:
            node.become(NodeState.ACTIVE)
            node.drain.note = "undrained"
        return node

    async def clear(self) -> None:
        """A term ended: the drains stop (a new leader starts with every node active)."""
        done, self._tasks = self._tasks, TaskOwner("drain")
        self._running.clear()
        self._before.clear()
        await done.cancel()

    # -- the drain itself -----------------------------------------------------------------

    def _here(self, node: Node) -> list[BlockEntry]:
        return self.state.index.on(node.node_id)

    async def _run(self, node: Node, timeout_s: float) -> None:
        end = time.monotonic() + timeout_s
        pause = PAUSE_S
        try:
            while self.state.nodes.get(node.node_id) is node:
                progressed = await self._pass(node)
                if not node.drain.left:
                    node.become(NodeState.DRAINED)
                    node.drain.finished = time.time()
                    node.drain.note = "holds no block: it can be stopped"
                    log.info("node %s is drained (%d blocks moved, %d replicas dropped)",
                             node.node_id, node.drain.moved, node.drain.dropped)
                    return
                if time.monotonic() > end:
                    node.become(NodeState.STUCK)
                    node.drain.note = f"deadline passed: {node.drain.note}"
                    log.warning("drain of %s stuck: %s", node.node_id, node.drain.note)
                    return
                # waiting (for leases, puts, room): back off, up to MAX_PAUSE_S between passes
                pause = PAUSE_S if progressed else min(MAX_PAUSE_S, pause * 2)
                if not progressed:
                    await asyncio.sleep(pause)
        finally:
            if self._running.get(node.node_id) is asyncio.current_task():
                del self._running[node.node_id]

    async def _pass(self, node: Node) -> bool:
        """One pass; True when anything moved or went. Updates the node's progress."""
        here = self._here(node)
        lone = [e for e in here if e.state is BlockState.COMPLETE
                and all(r.node == node.node_id for r in e.replicas)]
        before = node.drain.moved + node.drain.dropped
        homeless = 0
        for start in range(0, len(lone), BATCH):
            homeless += await self._move(node, lone[start:start + BATCH])
        waiting = await self._drop_copied(node)
        here = self._here(node)
        pending = sum(e.state is BlockState.PENDING for e in here)
        d = node.drain
        d.left, d.waiting_leases = len(here), waiting
        reasons = [f"{n} {what}" for n, what in (
            (waiting, "held by readers' leases"), (pending, "puts in flight into it"),
            (homeless, "with no room on another node or a shared object tier"),
            (len(here) - waiting - pending - homeless, "moving between tiers")) if n > 0]
        d.note = f"{len(here)} blocks left: {', '.join(reasons)}" if here else ""
        return node.drain.moved + node.drain.dropped > before

    def _target(self, node: Node, size: int, full_ok: bool,
                region: str) -> tuple[Node, TierSpace, int] | None:
        """Space for one block in another active node's arena (inside the block's arena
        region there), fastest tier first; without ``full_ok`` only where it stays under
        the tier's high watermark."""
        for other, space in arena_candidates(self.state.nodes.values()):
            if other is node or space.allocator is None:
                continue
            if not full_ok and space.used + size > self.tiering.high(space.kind) * space.capacity:
                continue
            at = space.allocator.allocate(size, region)
            if at is not None:
                return other, space, at
        return None

    async def _move(self, node: Node, chunk: list[BlockEntry]) -> int:
        """Copy blocks that live only on the draining node; returns how many found no room."""
        st = self.state
        chunk = [e for e in chunk if e.state is BlockState.COMPLETE]
        for e in chunk:
            e.advance(BlockState.MOVING, BlockState.COMPLETE)
        homeless = 0
        try:
            sends: dict[tuple[str, TierKind], list[tuple[BlockEntry, Replica, int]]] = defaultdict(list)
            to_store: dict[TierKind, list[tuple[BlockEntry, Replica]]] = defaultdict(list)
            store = node.tiers.get(TierKind.OBJECT)
            for e in chunk:
                source = min((r for r in e.replicas if r.node == node.node_id),
                             key=lambda r: r.tier.rank)
                region = st.region(e)
                placed = self._target(node, e.size, False, region)
                if placed is None and store is not None and store.store:
                    to_store[source.tier].append((e, source))
                    continue
                if placed is None:
                    placed = await self._make_room(node, e.size, region)
                if placed is None:
                    homeless += 1
                    continue
                other, space, at = placed
                sends[(other.node_id, space.kind)].append((e, source, at))
            for (other_id, kind), items in sends.items():
                await self._send(node, st.nodes[other_id], kind, items)
            for tier, items in to_store.items():
                await self._copy_to_store(node, tier, items)
        finally:
            for e in chunk:
                if e.state is BlockState.MOVING:
                    e.advance(BlockState.COMPLETE, BlockState.MOVING)
        return homeless

    async def _make_room(self, node: Node, size: int,
                         region: str) -> tuple[Node, TierSpace, int] | None:
        """Demote the coldest blocks of the emptiest other arena to fit one block."""
        for other, space in arena_candidates(self.state.nodes.values()):
            if other is not node and space.allocator is not None:
                await self.tiering.relieve(other, space.kind, need=size)
                placed = self._target(node, size, True, region)
                if placed is None and await self.tiering.make_room(other, space.kind, size, region):
                    placed = self._target(node, size, True, region)  # the region's own, demoted
                if placed is not None:
                    return placed
        return None

    async def _send(self, node: Node, other: Node, kind: TierKind,
                    items: list[tuple[BlockEntry, Replica, int]]) -> None:
        landed = await send_copies(self.state, self.members, node, other, kind, items,
                                   f"drain of {node.node_id}")
        for e, at in landed:
            self._landed(node, e, Replica(other.node_id, kind, at, e.size))

    async def _copy_to_store(self, node: Node, tier: TierKind,
                             items: list[tuple[BlockEntry, Replica]]) -> None:
        st = self.state
        owner = st.owner(node, TierKind.OBJECT)
        try:
            results = await node.link.copy([e.key for e, _ in items], tier, TierKind.OBJECT,
                                           [0] * len(items))
        except KVPoolError as exc:
            log.warning("drain of %s: copying %d blocks to the object tier failed: %s",
                        node.node_id, len(items), exc)
            return
        space = st.space(owner, TierKind.OBJECT)
        for (e, r), res in zip(items, results):
            if not res.ok:
                if isinstance(res.error, (ChecksumMismatch, BlockNotFound)) and r in e.replicas:
                    st.lose_replica(e, r, res.error)
                continue
            if e.state is BlockState.REMOVED:
                await st.drop_on_daemon(owner, TierKind.OBJECT, [e.key])
                continue
            if space is not None:
                space.take(0, res.size)
            self._landed(node, e, Replica(owner, TierKind.OBJECT, 0, res.size))

    def _landed(self, node: Node, entry: BlockEntry, replica: Replica) -> None:
        st = self.state
        st.index.add_replica(entry, replica)
        st.events.stored([entry.shown], replica.node, replica.tier, Reason.DRAINED,
                         parent=entry.shown_parent, scope=entry.scope)
        st.counters["drain_moved"] += 1
        self._before[entry.key] = set(entry.leases)
        node.drain.moved += 1

    async def _drop_copied(self, node: Node) -> int:
        """Forget the node's replicas of blocks with a copy elsewhere that no earlier
        lease may still be reading; returns how many wait for leases."""
        st = self.state
        now = time.monotonic()
        waiting = 0
        by_tier: dict[TierKind, list[tuple[BlockEntry, Replica]]] = defaultdict(list)
        for e in self._here(node):
            if e.state is not BlockState.COMPLETE or all(r.node == node.node_id for r in e.replicas):
                continue
            e.leased(now)  # expire what has expired
            earlier = self._before.setdefault(e.key, set(e.leases)) & set(e.leases)
            if earlier:
                waiting += 1
                continue
            for r in [r for r in e.replicas if r.node == node.node_id]:
                by_tier[r.tier].append((e, r))
        for tier, items in by_tier.items():
            # Removed, or its replica lost, while an earlier tier's drop was awaited.
            items = [(e, r) for e, r in items if e.state is not BlockState.REMOVED
                     and any(x is r for x in e.replicas)]
            if items and not await st.retire(node.node_id, tier, items):  # invisible first
                return waiting  # the term ended meanwhile
            for e, r in items:
                st.events.removed([e.shown], node.node_id, tier, Reason.DRAINED, scope=e.scope)
                self._before.pop(e.key, None)
                node.drain.dropped += 1
        return waiting
