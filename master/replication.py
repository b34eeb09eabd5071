"""Re-replication: a block written with ``replicas=N`` that lost copies (its node died,
or a replica's bytes went bad) is copied again from a surviving copy until it is on N
distinct nodes again (or on every node, when fewer are left).

The blocks short of copies are noted as they lose them (PoolState.short); each sweep
copies at most BATCH of them, daemon to daemon through NIXL (master.copies), into arena
space under the tier's high watermark where there is any, so the background work never
pushes the pool into demotions of its own accord. The source stays where it is and
readable; it is marked MOVING while the copy runs, so no tier move frees it meanwhile.
"""

from __future__ import annotations

import logging
from collections import defaultdict

from kvpool.kv_events import Reason
from kvpool.tiers.base import TierKind
from master.copies import send_copies
from master.index import BlockEntry, BlockState, Replica
from master.membership import Membership
from master.nodes import Node, TierSpace
from master.placement import arena_candidates
from master.state import PoolState
from master.tiering import Tiering

log = logging.getLogger(__name__)
BATCH = 64  # blocks copied per sweep


class Replication:
    def __init__(self, state: PoolState, tiering: Tiering, members: Membership) -> None:
        self.state = state
        self.tiering = tiering
        self.members = members

    def _target(self, entry: BlockEntry, holders: set[str]) -> tuple[Node, TierSpace, int] | None:
        """Room for one more copy on a node that holds none: under the high watermark
        first, else wherever it fits."""
        candidates = [(n, s) for n, s in arena_candidates(self.state.nodes.values())
                      if n.node_id not in holders and s.allocator is not None]
        for polite in (True, False):
            for node, space in candidates:
                if polite and space.used + entry.size > self.tiering.high(space.kind) * space.capacity:
                    continue
                at = space.allocator.allocate(entry.size, self.state.region(entry))  # type: ignore[union-attr]
                if at is not None:
                    return node, space, at
        return None

    async def sweep(self) -> int:
        """Copy up to BATCH blocks that are short of copies; returns how many landed."""
        st = self.state
        if not st.short:
            return 0
        plan: dict[tuple[str, str, TierKind], list[tuple[BlockEntry, Replica, int]]] = defaultdict(list)
        for key in list(st.short):
            if sum(len(v) for v in plan.values()) >= BATCH:
                break
            entry = st.index.get(key)
            if entry is None or not entry.state.readable:
                st.short.discard(key)
                continue
            if entry.state is not BlockState.COMPLETE:
                continue  # moving between tiers: the next sweep
            live = [r for r in entry.replicas if r.node in st.nodes]
            holders = {r.node for r in live}
            reachable = holders | {n.node_id for n in st.nodes.values() if n.state.accepts}
            if not live or len(holders) >= min(entry.wanted, len(reachable)):
                st.short.discard(key)  # whole again, or only in a shared store
                continue
            placed = self._target(entry, holders)
            if placed is None:
                continue  # no room now: the next sweep
            other, space, at = placed
            source = min(live, key=lambda r: r.tier.rank)
            plan[(source.node, other.node_id, space.kind)].append((entry, source, at))
            st.freeing[(other.node_id, space.kind)] += _aligned(space, entry.size)  # held, not indexed
        copied = 0
        epoch, planned = st.epoch, dict(st.nodes)  # the nodes the offsets were allocated on
        for (src, dst, kind), items in plan.items():
            if not st.current(epoch):
                break  # the term ended during an earlier batch
            space = planned[dst].tiers[kind]
            st.freeing[(dst, kind)] -= sum(_aligned(space, e.size) for e, _, _ in items)
            source, target = planned[src], planned[dst]
            if st.nodes.get(src) is not source or st.nodes.get(dst) is not target:
                for _, _, at in items:  # one left during an earlier batch
                    target.tiers[kind].allocator.free(at)  # type: ignore[union-attr]
                continue
            # Moving, or removed, since the plan (during an earlier batch): not now.
            later = [(e, r, at) for e, r, at in items if e.state is not BlockState.COMPLETE
                     or not any(x is r for x in e.replicas)]
            for _, _, at in later:
                target.tiers[kind].allocator.free(at)  # type: ignore[union-attr]
            gone = {id(e) for e, _, _ in later}
            items = [item for item in items if id(item[0]) not in gone]
            if not items:
                continue
            for e, _, _ in items:
                e.advance(BlockState.MOVING, BlockState.COMPLETE)
            try:
                landed = await send_copies(st, self.members, source, target, kind, items,
                                           "re-replication")
            finally:
                for e, _, _ in items:
                    if e.state is BlockState.MOVING:
                        e.advance(BlockState.COMPLETE, BlockState.MOVING)
            for e, at in landed:
                st.index.add_replica(e, Replica(dst, kind, at, e.size))
                st.events.stored([e.shown], dst, kind, Reason.REPLICATED, parent=e.shown_parent,
                                 scope=e.scope)
                copied += 1
        if copied:
            st.counters["re_replicated"] += copied
            log.info("re-replicated %d blocks; %d still short of copies", copied, len(st.short))
        return copied


def _aligned(space: TierSpace, size: int) -> int:
    align = space.allocator.alignment if space.allocator is not None else 1
    return -(-size // align) * align
