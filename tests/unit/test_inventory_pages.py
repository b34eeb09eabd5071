"""Inventories travel in pages of one snapshot: a node holding more blocks than a page is
taken in whole, with its pins, and a page read after the daemon changed still belongs to
the moment the first page was asked."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from kvpool.codec import make_header
from kvpool.config import MasterConfig
from kvpool.coordinator import InProcessCoordinator
from kvpool.daemon_link import (InventoryPage, InventoryRequest, PinMark, StoredBlock,
                                TierDescription, inventory_pages, whole_inventory)
from kvpool.errors import BadRequest, ConfigError, InventoryExpired
from kvpool.keys import BlockKey
from kvpool.tiers.base import TierKind
from master.core import MasterCore
from tests.unit.fake_daemon import FakeDaemon

BLOCK = 4096
HEADER = make_header(np.zeros(BLOCK, np.uint8), "uint8").encode()


def key(i: int) -> BlockKey:
    return i.to_bytes(16, "little")


def holding(n: int, node_id: str = "n1") -> FakeDaemon:
    d = FakeDaemon(node_id, [TierDescription(TierKind.HOST, (n + 8) * BLOCK, address=1 << 40),
                             TierDescription(TierKind.SSD, 1 << 30)])
    for i in range(n):
        tier = TierKind.HOST if i % 3 else TierKind.SSD
        d.held[tier][key(i)] = StoredBlock(key(i), tier, i * BLOCK if tier is TierKind.HOST else 0,
                                           BLOCK, HEADER)
    return d


async def test_a_node_with_more_blocks_than_a_page_is_taken_in_whole() -> None:
    d = holding(250)
    d.marks[key(7)] = PinMark(key(7), pins=2)
    d.marks[key(201)] = PinMark(key(201), pins=1)
    core = MasterCore(MasterConfig(inventory_page=32), InProcessCoordinator(),
                      connect=lambda url: d)
    await core.members.join(d.registration_now())
    assert d.calls.count("inventory") == 8  # ceil(250 / 32)
    assert await core.reads.exists([key(i) for i in range(250)]) == [True] * 250
    assert len(core.state.index) == 250 and core.state.joining == {}
    host = core.state.nodes["n1"].tiers[TierKind.HOST]
    assert host.used == sum(1 for i in range(250) if i % 3) * BLOCK  # every extent is held
    assert core.state.index.get(key(7)).pins == 2 and core.state.index.get(key(201)).pins == 1
    assert core.state.index.get(key(8)).pins == 0
    await core.check()  # compares the index with the inventory, itself read in pages


async def test_pages_belong_to_the_moment_the_first_was_asked() -> None:
    d = holding(100)
    pages = inventory_pages(d, 30)
    first = await pages.__anext__()
    assert (first.total, first.next, len(first.blocks)) == (100, 30, 30)
    # Blocks come and go after the first page: the snapshot's later pages neither skip
    # nor repeat any, and show none of the changes.
    for i in range(40):
        del d.held[TierKind.HOST if i % 3 else TierKind.SSD][key(i)]
    d.held[TierKind.SSD][key(999)] = StoredBlock(key(999), TierKind.SSD, 0, BLOCK, HEADER)
    rest = [p async for p in pages]
    seen = [b.key for p in [first, *rest] for b in p.blocks]
    assert sorted(seen) == sorted(key(i) for i in range(100)) and rest[-1].done
    # A new listing sees the daemon as it is now.
    now = {b.key for b in await whole_inventory(d, 30)}
    assert now == {key(i) for i in range(40, 100)} | {key(999)}


async def test_a_snapshot_read_to_its_end_or_unknown_is_refused_with_a_typed_error() -> None:
    d = holding(10)
    first = await d.inventory(InventoryRequest(0, 0, 4))
    await d.inventory(InventoryRequest(first.snapshot, 4, 100))  # the last page
    with pytest.raises(InventoryExpired, match="start again"):
        await d.inventory(InventoryRequest(first.snapshot, 4, 4))
    with pytest.raises(InventoryExpired):
        await d.inventory(InventoryRequest(12345, 0, 4))


def test_bad_inventory_requests_and_page_sizes_are_refused() -> None:
    with pytest.raises(BadRequest, match="offset 0"):
        InventoryRequest.unpack({"snapshot": 0, "offset": 5})
    with pytest.raises(BadRequest, match="limit"):
        InventoryRequest.unpack({"limit": 0})
    with pytest.raises(BadRequest, match="unknown field"):
        InventoryRequest.unpack({"cursor": 1})
    with pytest.raises(ConfigError, match="inventory_page"):
        MasterConfig(inventory_page=10_000_000)


def test_a_page_travels_as_columns_and_a_malformed_one_is_refused_with_what_is_wrong() -> None:
    headers = [make_header(np.zeros(64 * (i + 1), np.uint8), "uint8").encode() for i in range(3)]
    good = [StoredBlock(bytes([i]) * 16, kind, 4096 * i + (1 << 40), 64 * (i + 1), h)
            for i, (kind, h) in enumerate(zip((TierKind.HOST, TierKind.SSD, TierKind.OBJECT), headers))]
    page = InventoryPage(7, 3, 3, good, [PinMark(good[0].key, 2, 1.5)])
    wire = msgpack.unpackb(msgpack.packb(page.pack()))  # what the master gets off the frame
    assert InventoryPage.unpack(wire) == page
    empty = InventoryPage(7, 0, 0, [], [])
    assert InventoryPage.unpack(msgpack.unpackb(msgpack.packb(empty.pack()))) == empty
    bad = {"a key short": ({"keys": wire["keys"][:-1]}, "47 bytes of 'keys', not 48"),
           "a size missing": ({"sizes": wire["sizes"][:16]}, "16 bytes of 'sizes', not 24"),
           "an unknown tier": ({"tiers": b"\x00\x01\x09"}, "unknown tier code 9"),
           "ends past the headers": ({"headers": wire["headers"][:-1]}, "header ends"),
           "ends going back": ({"header_ends": np.array([40, 20, len(wire["headers"])], "<u4").tobytes()},
                               "header ends"),
           "a column of the wrong type": ({"locations": [1, 2, 3]}, "locations")}
    for what, (change, says) in bad.items():
        with pytest.raises(BadRequest, match=says):
            InventoryPage.unpack({**wire, **change})


async def test_a_daemon_failing_midway_leaves_nothing_of_it_in_the_index() -> None:
    d = holding(100)
    core = MasterCore(MasterConfig(inventory_page=30), InProcessCoordinator(),
                      connect=lambda url: d)
    real = d.inventory

    async def fail_third(req: InventoryRequest):  # type: ignore[no-untyped-def]
        if req.offset >= 60:
            raise InventoryExpired("gone")
        return await real(req)

    d.inventory = fail_third  # type: ignore[method-assign]
    with pytest.raises(InventoryExpired):
        await core.members.join(d.registration_now())
    assert len(core.state.index) == 0 and core.state.nodes == {} and core.state.joining == {}
    d.inventory = real  # type: ignore[method-assign]
    await core.members.join(d.registration_now())  # taken in on the next try
    assert len(core.state.index) == 100


def chained(runs: int, length: int, node_id: str = "n1") -> tuple[FakeDaemon, list[list[BlockKey]]]:
    """A daemon holding ``runs`` prefix chains of ``length`` blocks, listed in put order,
    with a block in the middle of the host arena already taken (by no one the master knows)."""
    d = FakeDaemon(node_id, [TierDescription(TierKind.HOST, (runs * length + 8) * BLOCK,
                                             address=1 << 40)])
    chains, at = [], 0
    for r in range(runs):
        parent, chain = None, []
        for i in range(length):
            k = key(1000 * r + i + 1)
            header = make_header(np.zeros(BLOCK, np.uint8), "uint8", parent=parent).encode()
            d.held[TierKind.HOST][k] = StoredBlock(k, TierKind.HOST, at, BLOCK, header)
            chain.append(k)
            parent, at = k, at + BLOCK
        chains.append(chain)
    return d, chains


async def test_a_joining_node_is_told_as_chained_runs_and_its_leaving_names_every_block() -> None:
    """What a KV-aware router sees of a (re)joining node: every block, each event a chain
    with the parent of its first block, as vLLM's BlockStored; a bad item or one at an
    extent listed twice is left out and named in no event; a node that leaves is one
    BlockRemoved per tier for up to 1000 keys."""
    d, chains = chained(3, 700)
    # An item whose extent another one holds already, and one with a corrupt header.
    d.held[TierKind.HOST][key(9001)] = StoredBlock(key(9001), TierKind.HOST, 5 * BLOCK, BLOCK,
                                                   make_header(np.zeros(BLOCK, np.uint8), "uint8").encode())
    d.held[TierKind.HOST][key(9002)] = StoredBlock(key(9002), TierKind.HOST, 2200 * BLOCK, BLOCK, b"junk")
    core = MasterCore(MasterConfig(inventory_page=500), InProcessCoordinator(),
                      connect=lambda url: d)
    first = core.state.events.last_id
    await core.members.join(d.registration_now())
    stored = [e for e in core.state.events.recent(1000) if e.id > first]
    assert all(e.type.value == "BlockStored" and e.reason.value == "inventory" for e in stored)
    seen = [k for e in stored for k in e.block_hashes]
    assert sorted(seen) == sorted(k for c in chains for k in c)  # each block once, no bad one
    by_key = {k: (c, i) for c in chains for i, k in enumerate(c)}
    for e in stored:
        chain, i = by_key[e.block_hashes[0]]
        assert list(e.block_hashes) == chain[i:i + len(e.block_hashes)]
        assert e.parent_block_hash == (chain[i - 1] if i else None)
    assert len(stored) <= 3 * 2 + 2  # a run breaks at a chain's start and at a chunk's end
    assert len(core.state.index) == 2100 and core.state.index.get(key(9001)) is None
    host = core.state.nodes["n1"].tiers[TierKind.HOST]
    assert host.used == 2100 * BLOCK
    host.allocator.check()  # type: ignore[union-attr]
    core.state.index.check()

    before = core.state.events.last_id
    await core.members.drop("n1", "test")
    removed = [e for e in core.state.events.recent(100) if e.id > before]
    assert sorted(k for e in removed for k in e.block_hashes) == sorted(seen)
    assert [len(e.block_hashes) for e in removed] == [1000, 1000, 100]
    assert len(core.state.index) == 0 and core.state.index.on("n1") == []
    core.state.index.check()
