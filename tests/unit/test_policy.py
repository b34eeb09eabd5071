"""Eviction/admission policies (master/policy.py) and the trace simulator's bounds."""

from __future__ import annotations

import time

import pytest

from kvpool.tiers.base import TierKind
from master.index import BlockEntry, BlockState, Index, Replica
from master.policy import (DEFAULT_POLICY, LRU, POLICIES, BlockInfo, HitDensityFactory, LRUFactory,
                           ReuseAwareFactory)
from scripts.tracesim import Request, belady, distinct_blocks, ideal_hit_rate, simulate


def k(n: int) -> bytes:
    return n.to_bytes(16, "little")


def put_run(policy, keys: list[int], parent: int | None = None, now: float = 0.0) -> None:
    """Write a chain of blocks the way a put does: each chains from the one before."""
    for n in keys:
        policy.inserted(BlockInfo(k(n), 1, None if parent is None else k(parent)), now)
        parent = n


def test_registry_names_lru_and_the_default():
    assert "lru" in POLICIES and DEFAULT_POLICY in POLICIES
    for name, make in POLICIES.items():
        assert make().make("host", 100).name == name


def test_lru_order_follows_reads():
    p = LRU()
    for n in (1, 2, 3):
        p.inserted(BlockInfo(k(n), 1, None), 0.0)
    p.accessed(k(1), 1.0)
    assert list(p.victims()) == [k(2), k(3), k(1)]
    p.removed(k(2))
    assert list(p.victims()) == [k(3), k(1)] and len(p) == 2
    assert p.admit(BlockInfo(k(9), 1, None), 0.0)


def test_reuse_evicts_leaves_before_what_they_chain_from():
    p = ReuseAwareFactory().make("host", 100)
    put_run(p, [1, 2, 3])
    assert list(p.victims())[-2:] == [k(1), k(2)]  # blocks with a child here go last
    p.removed(k(3))
    assert next(iter(p.victims())) == k(2)


def test_reuse_evicts_the_trailing_block_of_a_put_first():
    p = ReuseAwareFactory().make("host", 100)
    put_run(p, [1, 2, 3])  # 3: the request's trailing (partial) block
    put_run(p, [10, 11], parent=None)  # a new run starts: 3 is known to be a tail
    assert next(iter(p.victims())) == k(3)
    p.removed(k(3))
    assert next(iter(p.victims())) == k(2)  # then least recently used among the leaves


def test_reuse_keeps_a_read_block_past_newer_unread_ones():
    lru, reuse = LRUFactory().make("host", 4), ReuseAwareFactory(bonus=1.0).make("host", 4)
    for p in (lru, reuse):
        put_run(p, [1])
        p.accessed(k(1), 1.0)
        for n in (2, 3, 4):
            put_run(p, [n])
    assert next(iter(lru.victims())) == k(1)
    assert list(reuse.victims())[-1] == k(1)


def test_reuse_admission_refuses_tails_into_a_cold_tier():
    f = ReuseAwareFactory()
    host, ssd = f.make("host", 100), f.make("ssd", 100)
    put_run(host, [1, 2])
    put_run(host, [5])  # 2 is the tail of the first run
    assert ssd.admit(BlockInfo(k(1), 1, None), 0.0)
    assert not ssd.admit(BlockInfo(k(2), 1, k(1)), 0.0)
    assert ReuseAwareFactory(admit_tails=True).make("ssd", 100).admit(BlockInfo(k(2), 1, k(1)), 0.0)


def test_reuse_history_follows_a_block_between_tiers_and_is_bounded():
    f = ReuseAwareFactory()
    host, ssd = f.make("host", 100), f.make("ssd", 100)
    put_run(host, [1])
    host.accessed(k(1), 1.0)
    ssd.inserted(BlockInfo(k(1), 1, None), 2.0)  # demoted: the read follows it
    host.removed(k(1))
    assert f.history[k(1)].hits == 1
    ssd.removed(k(1))
    assert not f.history  # nothing is kept for a block no tier holds
    for n in range(1000):
        put_run(host, [n])
        if n >= 10:
            host.removed(k(n - 10))
    assert len(host) == 10 and len(f.history) == 10


def test_reuse_victims_are_each_held_key_once():
    p = ReuseAwareFactory().make("host", 100)
    put_run(p, [1, 2, 3])
    put_run(p, [4, 5], parent=1)
    for n in (1, 2, 4):
        p.accessed(k(n), 1.0)
    got = list(p.victims())
    assert sorted(got) == sorted(k(n) for n in (1, 2, 3, 4, 5)) and len(p) == 5


def synthetic() -> list[Request]:
    """One conversation read every tenth request, one-off requests in between whose only
    new block is their trailing one: LRU's window is shorter than the reuse gap, and the
    default spends its room on trailing blocks first."""
    reqs, uid = [], 100
    hot = (k(0), k(1), k(2))
    for t in range(200):
        if t % 10 in (0, 1):
            reqs.append(Request(float(t), hot))
        else:
            reqs.append(Request(float(t), (k(0), k(uid))))  # a one-off: a trailing block only
            uid += 1
    return reqs


def test_default_beats_lru_on_a_synthetic_trace():
    reqs = synthetic()
    n = distinct_blocks(reqs)
    frac = 6 / n
    lru = simulate(reqs, LRUFactory(), frac, distinct=n)
    default = simulate(reqs, POLICIES[DEFAULT_POLICY](), frac, distinct=n)
    best = belady(reqs, frac, distinct=n)
    assert lru.hit_rate < default.hit_rate <= best.hit_rate <= ideal_hit_rate(reqs)


def test_simulator_with_unlimited_capacity_is_ideal():
    reqs = synthetic()
    n = distinct_blocks(reqs)
    for f in (LRUFactory(), ReuseAwareFactory()):
        assert simulate(reqs, f, 1.0, distinct=n).hit_rate == ideal_hit_rate(reqs)
        two = simulate(reqs, f, 0.02, 0.98, distinct=n)
        assert two.hit_rate == ideal_hit_rate(reqs)
    assert belady(reqs, 1.0, distinct=n).hit_rate == ideal_hit_rate(reqs)


def chain_index(name: str) -> Index:
    """Blocks 1 <- 2 <- 3 (a chain) and a lone 9, in one host tier under policy ``name``."""
    factory = POLICIES[name]()
    index = Index(lambda owner, kind: factory.make(kind.value, 100))
    for n, parent in [(1, None), (2, 1), (3, 2), (9, None)]:
        index.add(BlockEntry(k(n), 1, BlockState.COMPLETE, [Replica("n1", TierKind.HOST, 0, 1)],
                             header=b"h", parent=None if parent is None else k(parent)))
    return index


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_every_policy_is_prefix_aware_and_respects_pins(name: str):
    index, now = chain_index(name), time.monotonic()
    order = [e.key[0] for e in index.coldest("n1", TierKind.HOST, now)]
    assert sorted(order) == [1, 2, 3, 9] and order.index(3) < order.index(2) < order.index(1)
    index.get(k(3)).pins = 1  # 3 cannot move: neither may what it chains from, but 9 may
    assert [e.key[0] for e in index.coldest("n1", TierKind.HOST, now, leaves_only=True)] == [3, 9]
    index.get(k(3)).pins = 0
    index.get(k(9)).soft_until = now + 60  # soft-pinned: after every unpinned block
    assert [e.key[0] for e in index.coldest("n1", TierKind.HOST, now)][-1] == 9
    assert [e.key[0] for e in index.coldest("n1", TierKind.HOST, now, leaves_only=True)] == [3, 2, 1]


def test_density_learns_which_class_is_read_again():
    """A quarter of the new blocks are read a round after their write, and every block
    read once is read again a round later: a block read once then outranks a newer unread
    one, which LRU would keep instead."""
    p = HitDensityFactory(samples=8).make("host", 64)
    for n in range(0, 400, 4):
        for m in range(n, n + 4):
            put_run(p, [m])
        for m in (n - 4, n - 8):  # a first read, a second read
            if m >= 0:
                p.accessed(k(m), 0.0)
        for old in range(n - 40, n - 36):
            if old >= 0:
                p.removed(k(old))
    put_run(p, [1000])
    p.accessed(k(1000), 0.0)  # read once
    for m in (1001, 1002, 1003):  # newer, never read
        put_run(p, [m])
    order = list(p.victims())
    lru = LRUFactory().make("host", 64)
    for m in (1000, 1001):
        put_run(lru, [m])
    assert order.index(k(1001)) < order.index(k(1000)) and next(iter(lru.victims())) == k(1000)
    assert sorted(order) == sorted(p._entries)  # every held key, once


def test_unchained_puts_have_no_trailing_blocks_to_refuse():
    f = ReuseAwareFactory()
    host, ssd = f.make("host", 100), f.make("ssd", 100)
    for n in (1, 2, 3):  # one-block puts without chain links
        host.inserted(BlockInfo(k(n), 1, None), 0.0)
    assert all(ssd.admit(BlockInfo(k(n), 1, None), 0.0) for n in (1, 2))


def test_a_cold_copy_that_a_faster_tier_holds_goes_first_whatever_chains_from_it():
    index = Index(lambda owner, kind, f=ReuseAwareFactory(): f.make(kind.value, 100))
    for n, parent in [(1, None), (2, 1), (3, None)]:
        index.add(BlockEntry(k(n), 1, BlockState.COMPLETE, [Replica("n1", TierKind.SSD, 0, 1)],
                             header=b"h", parent=None if parent is None else k(parent)))
    now = time.monotonic()
    first = [e.key[0] for e in index.coldest("n1", TierKind.SSD, now, leaves_only=True)]
    assert first.index(2) < first.index(1)  # 1 waits for what chains from it
    index.add_replica(index.get(k(1)), Replica("n1", TierKind.HOST, 0, 1))  # promoted: 1 is in host too
    assert [e.key[0] for e in index.coldest("n1", TierKind.SSD, now, leaves_only=True)][0] == 1
    index.drop_replica(index.get(k(1)), index.get(k(1)).replica("n1", TierKind.HOST))
    assert [e.key[0] for e in index.coldest("n1", TierKind.SSD, now, leaves_only=True)][0] != 1
    index.check()


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_batch_of_arrivals_ranks_as_one_arrival_at_a_time(name: str):
    """``inserted_many`` (a rebuild's pages) leaves each tier as ``inserted`` one by one
    would: the same victims in the same order, the same order of ranks, in a hot and a cold tier
    sharing one history, before and after reads and removals."""
    import random
    rng = random.Random(7)
    arrivals: list[BlockInfo] = []
    for run in range(40):  # chains, some continuing an earlier chain, some unchained
        parent = rng.choice([None, None, *(i.key for i in arrivals[-50:])])
        for n in range(rng.randint(1, 12)):
            info = BlockInfo(k(1000 * run + n), rng.choice([1, 2, 4]), parent)
            arrivals.append(info)
            parent = info.key if rng.random() < 0.9 else None
    one, many = POLICIES[name](), POLICIES[name]()
    tiers = [(one.make(t, 200), many.make(t, 200)) for t in ("host", "ssd")]
    for (a, b), part in zip(tiers, (arrivals[::2], arrivals)):  # ssd holds every block
        for info in part:
            a.inserted(info, 0.0)
        b.inserted_many(part, 0.0)

    def same() -> None:
        for a, b in tiers:
            assert list(a.victims()) == list(b.victims())
            assert sorted(a.keys(), key=a.rank) == sorted(b.keys(), key=b.rank)
            assert len(a) == len(b) and set(a.keys()) == set(b.keys())

    same()
    for info in rng.sample(arrivals, 60):
        for a, b in tiers:
            a.accessed(info.key, 1.0)
            b.accessed(info.key, 1.0)
    same()
    for info in rng.sample(arrivals[::2], 30):
        tiers[0][0].removed(info.key)
        tiers[0][1].removed(info.key)
    same()
