"""Copying blocks from one node's tier into space allocated in another node's arena, for
a drain and for re-replication alike: the source daemon writes them through NIXL under a
deadline, the target daemon records them, and only then may the caller index the copies.

A copy whose block was removed meanwhile is dropped again before its space is reused; a
source replica whose bytes turn out bad or gone leaves the index; a pinned block's pins
go with its copy, so the new holder reports them to a later leader.
"""

from __future__ import annotations

import logging
import time

from kvpool.daemon_link import SendItem, SendTarget, StoredBlock
from kvpool.errors import BadRequest, BlockNotFound, ChecksumMismatch, KVPoolError
from kvpool.tiers.base import TierKind
from master.index import BlockEntry, BlockState, Replica
from master.membership import Membership
from master.nodes import Node
from master.state import PoolState

log = logging.getLogger(__name__)
SEND_DEADLINE_S = 30.0
SEND_SLACK_S = 2.0  # past the deadline, before space a failed send may have written is reused


async def send_copies(st: PoolState, members: Membership, node: Node, other: Node, kind: TierKind,
                      items: list[tuple[BlockEntry, Replica, int]], why: str
                      ) -> list[tuple[BlockEntry, int]]:
    """Copy ``(entry, source replica on node, offset in other's kind arena)`` items; the
    offsets were allocated by the caller and are freed here for every copy that does not
    land. Returns the copies that landed, recorded by ``other``, for the caller to index."""
    space = other.tiers[kind]
    assert space.allocator is not None

    def free_all() -> None:
        for _, _, at in items:
            space.allocator.free(at)  # type: ignore[union-attr]

    found = members.agent_metadata([other.agent]).get(other.agent)
    meta = found[0] if found else None
    if meta is None or st.nodes.get(other.node_id) is not other:
        free_all()
        return []
    target = SendTarget(meta, space.mem_type, space.device, SEND_DEADLINE_S)
    epoch = st.epoch
    try:
        results = await node.link.send(target, [SendItem(e.key, r.tier, space.address + at)
                                                for e, r, at in items])
    except KVPoolError as exc:
        log.warning("%s: sending %d blocks from %s to %s failed: %s", why, len(items),
                    node.node_id, other.node_id, exc)
        # The source may still write them (it was frozen with the call in hand): their
        # space is reused only past the send's deadline.
        if st.current(epoch):
            st.free_later(other, kind, [(e.key, at, e.size) for e, _, at in items],
                          SEND_DEADLINE_S + SEND_SLACK_S)
        return []
    if not st.current(epoch):
        return []  # the term ended: the next one took in whatever landed from inventories
    landed = []
    for (e, r, at), res in zip(items, results):
        if res.ok and e.state is not BlockState.REMOVED:
            landed.append((e, at))
            continue
        space.allocator.free(at)
        if not res.ok and isinstance(res.error, (ChecksumMismatch, BlockNotFound)) and r in e.replicas:
            st.lose_replica(e, r, res.error)
    if not landed:
        return []
    try:
        await other.link.adopt([StoredBlock(e.key, kind, at, e.size, e.header) for e, at in landed])
    except KVPoolError as exc:
        log.warning("%s: %s did not record %d blocks: %s", why, other.node_id, len(landed), exc)
        if isinstance(exc, BadRequest):  # refused, nothing recorded
            st.diverged(other.node_id, exc)  # records the index lacks may be in the way
            for _, at in landed:
                space.allocator.free(at)
        elif st.current(epoch):  # it may have recorded them: settled later
            st.free_later(other, kind, [(e.key, at, e.size) for e, at in landed], 0.0)
        return []
    if not st.current(epoch):
        return []
    kept, gone = [], []
    for e, at in landed:
        alive = st.nodes.get(other.node_id) is other
        (kept if alive and e.state is not BlockState.REMOVED else gone).append((e, at))
    if gone:  # removed meanwhile: the copy goes before its space is reused
        await st.drop_on_daemon(other.node_id, kind, [e.key for e, _ in gone])
        for _, at in gone:
            space.allocator.free(at)
    now = time.monotonic()
    pinned = [st.pin_mark(e) for e, _ in kept if e.pins or e.soft_pinned(now)]
    if pinned:
        try:
            await other.link.mark(pinned)
        except KVPoolError as exc:
            log.warning("%s: %s did not record the pins of %d blocks: %s", why, other.node_id,
                        len(pinned), exc)
    return kept
