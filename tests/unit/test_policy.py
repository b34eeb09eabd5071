"""Eviction/admission policies (master/policy.py) and the trace simulator's bounds."""

from __future__ import annotations

from master.policy import (DEFAULT_POLICY, LRU, POLICIES, BlockInfo, LRUFactory,
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
