"""The router's choice of engine, as the pure function it is (no processes): an engine's
own pages (as its KV events report them) weigh above the pool's blocks, which weigh by
medium above computing; load still counts."""

from __future__ import annotations

import pytest

from engine.router import BlockView, EngineRef, choose
from kvpool.errors import Unavailable
from kvpool.keys import Namespace, block_keys

NS = Namespace("m", "float32", "PLCHTD:test", block_tokens=16)


def prefill(url: str, **kw: object) -> EngineRef:
    return EngineRef(url, "prefill", ns=NS, reports=True, **kw)  # type: ignore[arg-type]


def stored(view: BlockView, keys: list[bytes], node: str = "e", medium: str = "gpu") -> None:
    view.apply({"type": "BlockStored", "block_hashes": [k.hex() for k in keys], "node": node,
                "medium": medium})


def test_prefill_goes_to_the_engine_whose_own_pages_hold_the_prefix() -> None:
    a, b = prefill("a"), prefill("b")
    prompt = list(range(100))
    keys = block_keys(NS, prompt)
    pool = BlockView()
    stored(pool, keys[:4], "node0", "host")  # either engine could load it from the pool
    stored(b.pages, keys[:4])  # b holds it in its own pages
    engine, got, hit = choose([a, b], "prefill", prompt, pool)
    assert engine is b and hit == 4 and len(got) == 6
    # b's pages were taken for other work: both would now load from the pool, a tie
    b.pages.apply({"type": "BlockRemoved", "block_hashes": [k.hex() for k in keys[:4]],
                   "node": "e", "medium": "gpu"})
    assert choose([a, b], "prefill", prompt, pool)[0] is a


def test_the_pool_weighs_by_medium_and_above_computing() -> None:
    a = prefill("a", running_tokens=20)
    b = prefill("b")
    prompt = list(range(64))
    keys = block_keys(NS, prompt)
    # a holds 2 blocks itself; b would compute all 64 tokens: a costs 20 + 32 < 64
    stored(a.pages, keys[:2])
    assert choose([a, b], "prefill", prompt)[0] is a
    # with all 4 blocks on the pool's SSD, b loads them (4 * 16 * 0.3 = 19.2 tokens' worth)
    pool = BlockView()
    stored(pool, keys, "node0", "ssd")
    assert choose([a, b], "prefill", prompt, pool)[0] is b
    # a purge of the whole pool empties the router's view of it
    pool.apply({"type": "AllBlocksCleared"})
    assert len(pool) == 0


def test_a_follower_that_missed_events_forgets_what_it_knew() -> None:
    view = BlockView()
    stored(view, block_keys(NS, list(range(32))))
    assert len(view) == 2
    view.apply({"type": "EventsLost", "missed": 3})
    assert len(view) == 0


def test_load_outweighs_a_small_overlap() -> None:
    a, b = prefill("a"), prefill("b", running=3, running_tokens=4000)
    prompt = list(range(100))
    stored(b.pages, block_keys(NS, prompt[:32]))
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


def test_an_engine_that_does_not_report_is_guessed_from_what_it_was_sent() -> None:
    a = EngineRef("a", "prefill", ns=NS, capacity=64)
    a.remember(block_keys(NS, list(range(16 * 100))))
    assert len(a.sent) == a.capacity == 64
    assert a.overlap(block_keys(NS, list(range(16 * 100)))) == 64  # the leaves went first
