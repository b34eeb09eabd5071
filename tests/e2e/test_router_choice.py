"""The router's choice of engine, as the pure function it is (no processes)."""

from __future__ import annotations

import pytest

from engine.router import EngineRef, choose
from kvpool.errors import Unavailable
from kvpool.keys import Namespace, block_keys

NS = Namespace("m", "float32", "PLCHTD:test", block_tokens=16)


def prefill(url: str, **kw: object) -> EngineRef:
    return EngineRef(url, "prefill", ns=NS, capacity=64, **kw)  # type: ignore[arg-type]


def test_prefill_goes_where_the_prefix_is_cached() -> None:
    a, b = prefill("a"), prefill("b")
    prompt = list(range(100))
    b.remember(block_keys(NS, prompt[:64]))
    engine, keys, hit = choose([a, b], "prefill", prompt)
    assert engine is b and hit == 4 and len(keys) == 6


def test_load_outweighs_a_small_overlap() -> None:
    a, b = prefill("a"), prefill("b", running=3, running_tokens=4000)
    prompt = list(range(100))
    b.remember(block_keys(NS, prompt[:32]))
    assert choose([a, b], "prefill", prompt)[0] is a
    b.running_tokens = 10  # an almost idle engine with the prefix wins again
    assert choose([a, b], "prefill", prompt)[0] is b


def test_decode_by_running_requests_and_unhealthy_engines_are_skipped() -> None:
    d1 = EngineRef("d1", "decode", ns=NS, running=5)
    d2 = EngineRef("d2", "decode", ns=NS, running=1)
    assert choose([d1, d2], "decode", [1, 2])[0] is d2
    d2.healthy = False
    assert choose([d1, d2], "decode", [1, 2])[0] is d1
    d1.healthy = False
    with pytest.raises(Unavailable, match="no healthy decode engine"):
        choose([d1, d2], "decode", [1, 2])


def test_recent_blocks_are_bounded_by_the_engine_pages() -> None:
    a = prefill("a")
    a.remember(block_keys(NS, list(range(16 * 100))))
    assert len(a.recent) == a.capacity == 64
    assert a.overlap(block_keys(NS, list(range(16 * 100)))) == 64  # the leaves went first
