"""The master's index and placement decisions, with no network: eviction order, leases,
pins, and where new blocks go."""

from __future__ import annotations

import time

from kvpool.tiers.base import TierKind
from kvpool.daemon_link import RpcDaemonLink, TierDescription
from master.index import BlockEntry, BlockState, Index, Replica
from master.nodes import Node, tier_spaces
from master.placement import arena_candidates, extra_replica_spaces, pressured, relief_target


def entry(key: int, parent: int | None = None, state: BlockState = BlockState.COMPLETE) -> BlockEntry:
    return BlockEntry(bytes([key]) * 16, 4096, state, [Replica("n1", TierKind.HOST, key * 4096, 4096)],
                      header=b"h", parent=bytes([parent]) * 16 if parent is not None else None)


def test_coldest_first_and_leaves_before_their_prefix() -> None:
    index = Index()
    now = time.monotonic()
    for k, parent in [(1, None), (2, 1), (3, 2), (9, None)]:
        index.add(entry(k, parent))
    index.touch(index.get(bytes([1]) * 16))  # block 1 is now the most recently used
    order = [e.key[0] for e in index.coldest("n1", TierKind.HOST, now)]
    # 3 and 9 are leaves; 2 is cold but its successor 3 is cached, so it comes after 3 (as
    # if 3 were evicted first), and 1 (whose successor 2 is cached) after 2.
    assert order == [3, 2, 9, 1]
    assert [e.key[0] for e in index.coldest("n1", TierKind.HOST, now, leaves_only=True)] == [3, 2, 9, 1]
    index.get(bytes([3]) * 16).pins = 1  # 3 cannot move, so neither 2 nor 1 may go before it
    assert [e.key[0] for e in index.coldest("n1", TierKind.HOST, now)] == [3, 9, 2, 1]
    assert [e.key[0] for e in index.coldest("n1", TierKind.HOST, now, leaves_only=True)] == [3, 9]
    index.get(bytes([3]) * 16).pins = 0
    index.get(bytes([3]) * 16).state = BlockState.MOVING  # 3 is leaving: 2 may follow it
    assert [e.key[0] for e in index.coldest("n1", TierKind.HOST, now, leaves_only=True)] == [3, 2, 9, 1]
    index.get(bytes([3]) * 16).state = BlockState.COMPLETE
    index.remove(index.get(bytes([3]) * 16))  # 2 is a leaf now, and colder than 9
    assert [e.key[0] for e in index.coldest("n1", TierKind.HOST, now)] == [2, 9, 1]
    assert not index.successor_cached(index.get(bytes([2]) * 16), TierKind.HOST)
    index.check()


def test_prefix_links_hold_whatever_order_blocks_arrive_in() -> None:
    """After a restart the inventory lists blocks in any order: a successor indexed before
    its parent still keeps the parent for later."""
    index = Index()
    now = time.monotonic()
    index.add(entry(3, 2))
    index.add(entry(2, 1))
    index.add(entry(1, None))
    assert [e.key[0] for e in index.coldest("n1", TierKind.HOST, now)] == [3, 2, 1]
    # A successor cached only in a slower tier does not hold its parent in this one.
    slow = entry(4, 1)
    slow.replicas = [Replica("n1", TierKind.SSD, 0, 4096)]
    index.add(slow)
    index.remove(index.get(bytes([3]) * 16))
    index.remove(index.get(bytes([2]) * 16))
    assert [e.key[0] for e in index.coldest("n1", TierKind.HOST, now)] == [1]
    assert index.successor_cached(index.get(bytes([1]) * 16), TierKind.SSD)
    index.check()


def test_soft_pinned_blocks_go_after_every_unpinned_one_until_they_expire() -> None:
    index = Index()
    now = time.monotonic()
    for k in (1, 2, 3):
        index.add(entry(k))
    index.get(bytes([1]) * 16).soft_until = now + 60
    assert [e.key[0] for e in index.coldest("n1", TierKind.HOST, now)] == [2, 3, 1]
    assert [e.key[0] for e in index.coldest("n1", TierKind.HOST, now + 61)] == [1, 2, 3]


def test_leases_pins_and_state_decide_what_may_move() -> None:
    e = entry(5)
    now = time.monotonic()
    assert e.movable(now)
    e.leases[1] = now + 10
    assert not e.movable(now) and e.leased(now)
    e.leases[1] = now - 1  # expired leases no longer protect
    assert e.movable(now) and not e.leases
    e.pins = 1
    assert not e.movable(now)
    assert not entry(6, state=BlockState.PENDING).movable(now)


def node(node_id: str, host: int, used: int = 0) -> Node:
    tiers = tier_spaces([TierDescription(TierKind.HOST, host, address=1 << 40),
                         TierDescription(TierKind.SSD, 10 * host)], alignment=4096)
    if used:
        tiers[TierKind.HOST].allocator.allocate(used)  # type: ignore[union-attr]
    return Node(node_id, "http://127.0.0.1:1", "agent", tiers, RpcDaemonLink("http://127.0.0.1:1"))


def test_new_blocks_go_to_the_fastest_tier_then_preferred_then_emptiest_node() -> None:
    a, b = node("a", 1 << 30, used=800 << 20), node("b", 1 << 30)
    assert [n.node_id for n, _ in arena_candidates([a, b])] == ["b", "a"]
    assert [n.node_id for n, _ in arena_candidates([a, b], prefer="a")] == ["a", "b"]
    assert all(s.kind is TierKind.HOST for _, s in arena_candidates([a, b]))


def test_extra_replicas_go_to_other_nodes_emptiest_first() -> None:
    a, b, c = node("a", 1 << 30), node("b", 1 << 30, used=600 << 20), node("c", 1 << 30, used=100 << 20)
    assert [n.node_id for n, _ in extra_replica_spaces([a, b, c], "a", 2)] == ["c", "b"]
    assert [n.node_id for n, _ in extra_replica_spaces([a, b, c], "c", 1)] == ["a", "b"]
    assert extra_replica_spaces([a], "a", 2) == []  # one node: no second copy to be had
    assert extra_replica_spaces([a, b], "a", 0) == []


def test_pressure_and_relief_targets() -> None:
    full = node("full", 100 << 20, used=95 << 20)
    calm = node("calm", 100 << 20, used=50 << 20)
    assert pressured([full, calm], high=lambda kind: 0.9) == [(full, TierKind.HOST)]
    space = full.tiers[TierKind.HOST]
    assert relief_target(space, low=0.75) == int(0.75 * space.capacity)
    assert relief_target(space, low=0.75, need=40 << 20) == space.capacity - (40 << 20)
    assert full.below(TierKind.HOST) is TierKind.SSD and full.below(TierKind.SSD) is None


def test_cached_successors_follow_their_replicas_between_tiers() -> None:
    """What holds a parent in a tier is a successor cached there or faster: demoting the
    successors frees the parent in the host tier but still holds it in the SSD; relinking
    or removing them frees it there too (check() recounts every step)."""
    index = Index()
    root = entry(1)
    index.add(root)
    kids = [entry(k, 1) for k in (2, 3)]
    for e in kids:
        index.add(e)
    assert index.successor_cached(root, TierKind.HOST)
    for e in kids:  # a demotion: the SSD copy first, then the host one goes
        index.add_replica(e, Replica("n1", TierKind.SSD, 0, 4096))
        assert index.successor_cached(root, TierKind.HOST)
        index.drop_replica(e, e.replica("n1", TierKind.HOST))
        index.check()
    assert not index.successor_cached(root, TierKind.HOST)
    assert index.successor_cached(root, TierKind.SSD)
    assert [e.key[0] for e in index.coldest("n1", TierKind.HOST, time.monotonic(), leaves_only=True)] == [1]
    index.set_parent(kids[0], None)
    assert index.successor_cached(root, TierKind.SSD)
    index.remove(kids[1])
    assert not index.successor_cached(root, TierKind.SSD)
    index.check()
