"""The master's invariants, checked against itself, the allocators and every daemon's
inventory. Tests and operators call it after mutations and under load; an
AssertionError names the first discrepancy.

Exact at any moment: a daemon's inventory is a snapshot of the moment its first page is
served, and the index goes on changing while the pages come. So only replicas the index
held, settled, just before the inventory was asked for are compared (a put committed or
a move finished since may be on one side only), and a block the daemon holds counts as
stray only when the index knew it there at neither end; a block in flight (a put being
committed, a tier move, a removal under way) is set aside. A discrepancy is read again
once and reported only if the same block shows it both times.
"""

from __future__ import annotations

from collections import defaultdict

from kvpool.daemon_link import StoredBlock, whole_inventory
from kvpool.keys import BlockKey
from kvpool.tiers.base import TierKind
from master.index import BlockState, Replica
from master.nodes import Node
from master.state import PoolState

_SETTLED = (BlockState.COMPLETE,)


def busy(state: PoolState) -> set[BlockKey]:
    """Keys in flight now: their index entry and a daemon's inventory may disagree."""
    busy = {k for k, e in state.index.entries.items() if e.state not in _SETTLED}
    busy.update(state.dropping)
    busy.update(k for u in state.unsettled for k, _, _ in u.items)  # a daemon may hold them
    return busy


def _settled_on(state: PoolState, node: Node) -> dict[tuple[BlockKey, TierKind], int]:
    """(key, tier) -> location of the settled replicas the index puts on ``node``, now."""
    return {(e.key, r.tier): r.location for e in state.index.entries.values()
            if e.state in _SETTLED for r in e.replicas if r.node == node.node_id}


def _compare(state: PoolState, node: Node, inventory: list[StoredBlock], busy: set[BlockKey],
             known: dict[tuple[BlockKey, TierKind], int]) -> tuple[dict[BlockKey, str], int]:
    """What the index says of ``node`` against what it reported, for the replicas it held
    (``known``) before the inventory's snapshot; faults by block, replicas checked."""
    shared = {k for k, s in node.tiers.items() if s.store}
    reported = {(b.key, b.tier): b for b in inventory if b.tier not in shared}
    faults: dict[BlockKey, str] = {}
    checked = 0
    for entry in state.index.entries.values():
        if entry.key in busy or not entry.state.readable:
            continue
        for r in entry.replicas:
            if r.node != node.node_id or r.tier in shared:
                continue
            item = reported.pop((entry.key, r.tier), None)
            if known.get((entry.key, r.tier)) != r.location:
                continue  # placed (or moved) after the snapshot: it may be on one side only
            if item is None:
                faults[entry.key] = (f"{entry.key.hex()} is indexed on {node.node_id}/"
                                     f"{r.tier.value}, which lacks it")
            elif item.location != r.location:
                faults[entry.key] = f"{entry.key.hex()}: location differs"
            else:
                checked += 1
    stray = [k for k, t in reported if k not in busy and (k, t) not in known]
    if stray:
        faults[stray[0]] = (f"{node.node_id} holds {len(stray)} blocks the index does not "
                            f"know, e.g. {stray[0].hex()}")
    return faults, checked


def _check_space(state: PoolState) -> None:
    """Allocators and cold-tier counts against the index's replicas (no await: one moment).
    An arena destination is allocated before its copy lands, so blocks in flight may hold
    up to their size more than the index shows, and so does the space PoolState.freeing
    counts (replicas a daemon is forgetting, space a call with an unknown outcome may
    still write, re-replication copies planned but not yet sent)."""
    held: dict[tuple[str, TierKind], list[Replica]] = defaultdict(list)
    moving = 0
    for entry in state.index.entries.values():
        if entry.state is BlockState.MOVING:
            moving += entry.size
        for r in entry.replicas:
            held[(r.node, r.tier)].append(r)
    for node in state.nodes.values():
        for kind, space in node.tiers.items():
            if space.store:
                continue  # checked once per store below
            replicas = held.get((node.node_id, kind), [])
            if space.allocator is not None:
                space.allocator.check()
                align = space.allocator.alignment
                expected = sum(-(-r.size // align) * align for r in replicas)
                leaving = state.freeing[(node.node_id, kind)]
                slack = -(-moving // align) * align + (align if moving else 0) + leaving
                assert expected <= space.allocator.used <= expected + slack, (
                    f"{node.node_id}/{kind.value}: allocator holds {space.allocator.used} "
                    f"bytes, the index's replicas {expected}")
            else:
                leaving = state.freeing[(node.node_id, kind)]
                assert space.cold_used == sum(r.size for r in replicas) + leaving, (
                    f"{node.node_id}/{kind.value}: {space.cold_used} bytes counted, "
                    f"replicas hold {sum(r.size for r in replicas)}")
    for owner, space in state.stores.items():
        replicas = held.get((owner, TierKind.OBJECT), [])
        leaving = state.freeing[(owner, TierKind.OBJECT)]
        assert space.cold_used == sum(r.size for r in replicas) + leaving, (
            f"store {owner[1:]}: {space.cold_used} bytes counted, replicas hold "
            f"{sum(r.size for r in replicas)}")


async def check(state: PoolState) -> dict[str, int]:
    state.index.check()
    checked = 0
    for node in list(state.nodes.values()):
        faults: dict[BlockKey, str] | None = None
        for _attempt in range(2):
            before, known = busy(state), _settled_on(state, node)
            inventory = await whole_inventory(node.link, state.cfg.inventory_page)
            if state.nodes.get(node.node_id) is not node:
                faults = {}  # it left meanwhile: nothing of it to compare
                break
            found, n = _compare(state, node, inventory, before | busy(state), known)
            faults = found if faults is None else {k: m for k, m in found.items() if k in faults}
            if not faults:
                checked += n
                break
        assert not faults, next(iter(faults.values()))
    _check_space(state)
    for owner in state.stores:
        checked += sum(1 for e in state.index.entries.values() for r in e.replicas if r.node == owner)
    return {"replicas_checked": checked}
