"""The master's invariants, checked against itself, the allocators and every daemon's
inventory. Tests call it after mutations; an AssertionError names the first discrepancy."""

from __future__ import annotations

from collections import defaultdict

from kvpool.tiers.base import TierKind
from master.index import BlockState, Replica
from master.state import PoolState


async def check(state: PoolState) -> dict[str, int]:
    state.index.check()
    entries = list(state.index.entries.values())
    held: dict[tuple[str, TierKind], list[Replica]] = defaultdict(list)
    for entry in entries:
        for r in entry.replicas:
            held[(r.node, r.tier)].append(r)
    checked = 0
    for node in list(state.nodes.values()):
        inventory = await node.link.inventory()
        shared = {k for k, s in node.tiers.items() if s.store}
        reported = {(b.key, b.tier): b for b in inventory if b.tier not in shared}
        for kind, space in node.tiers.items():
            if space.store:
                continue  # checked once per store below
            replicas = held.get((node.node_id, kind), [])
            if space.allocator is not None:
                space.allocator.check()
                align = space.allocator.alignment
                expected = sum(-(-r.size // align) * align for r in replicas)
                assert space.allocator.used == expected, (
                    f"{node.node_id}/{kind.value}: allocator holds {space.allocator.used} "
                    f"bytes, the index's replicas {expected}")
            else:
                assert space.cold_used == sum(r.size for r in replicas), (
                    f"{node.node_id}/{kind.value}: {space.cold_used} bytes counted, "
                    f"replicas hold {sum(r.size for r in replicas)}")
        for entry in entries:
            if not entry.state.readable:
                continue
            for r in entry.replicas:
                if r.node != node.node_id:
                    continue
                item = reported.pop((entry.key, r.tier), None)
                assert item is not None, (f"{entry.key.hex()} is indexed on "
                                          f"{node.node_id}/{r.tier.value}, which lacks it")
                assert item.location == r.location, f"{entry.key.hex()}: location differs"
                checked += 1
        pending = {e.key for e in entries if e.state is BlockState.PENDING}
        stray = [k for k, _ in reported if k not in pending]
        assert not stray, (f"{node.node_id} holds {len(stray)} blocks the index does not "
                           f"know, e.g. {stray[0].hex()}")
    for owner, space in state.stores.items():
        replicas = held.get((owner, TierKind.OBJECT), [])
        assert space.cold_used == sum(r.size for r in replicas), (
            f"store {owner[1:]}: {space.cold_used} bytes counted, replicas hold "
            f"{sum(r.size for r in replicas)}")
        checked += len(replicas)
    return {"replicas_checked": checked}
