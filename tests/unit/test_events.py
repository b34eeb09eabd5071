"""The event ring: ids that only grow, resuming from an id, and gaps told, never skipped."""

from __future__ import annotations

import asyncio
import json

from kvpool.tiers.base import TierKind
from kvpool.kv_events import EventHub, EventType, Reason

K = [bytes([i]) * 16 for i in range(8)]


def test_ids_grow_and_a_resume_gets_exactly_what_followed() -> None:
    hub = EventHub(capacity=8)
    start = hub.last_id
    a = hub.stored([K[0]], "n0", TierKind.HOST, Reason.PUT, parent=None, block_size=16,
                   token_ids=[1, 2, 3])
    b = hub.stored([K[1]], "n0", TierKind.HOST, Reason.PUT, parent=K[0], block_size=16)
    c = hub.removed([K[0]], "n0", TierKind.HOST, Reason.EVICTED)
    assert [a.id, b.id, c.id] == [start + 1, start + 2, start + 3]
    gap, events = hub.since(a.id)
    assert gap is None and [e.id for e in events] == [b.id, c.id]
    assert hub.since(c.id) == (None, [])
    first = json.loads(a.sse().decode().split("data: ", 1)[1])
    assert first["block_hashes"] == [K[0].hex()] and first["token_ids"] == [1, 2, 3]
    assert first["medium"] == "host" and first["block_size"] == 16 and first["node"] == "n0"
    second = json.loads(b.sse().decode().split("data: ", 1)[1])
    assert second["parent_block_hash"] == K[0].hex() and "token_ids" not in second
    assert a.sse().startswith(f"id: {a.id}\nevent: BlockStored\n".encode())


def test_a_reader_behind_the_ring_is_told_how_much_it_missed() -> None:
    hub = EventHub(capacity=4)
    base = hub.last_id
    for i in range(10):
        hub.stored([K[i % 8]], "n0", TierKind.SSD, Reason.DEMOTED)
    gap, events = hub.since(base + 2)
    assert gap is not None and gap.missed == 4 and gap.resume == base + 7
    assert [e.id for e in events] == list(range(base + 7, base + 11))
    body = json.loads(gap.sse().decode().split("data: ", 1)[1])
    assert body["type"] == EventType.LOST and body["missed"] == 4


def test_an_id_this_master_never_issued_is_a_gap_of_unknown_size() -> None:
    hub = EventHub(capacity=4)
    hub.cleared()
    for bad in (0, hub.last_id + 100):
        gap, events = hub.since(bad)
        assert gap is not None and gap.missed is None
        assert [e.type for e in events] == [EventType.CLEARED]


async def test_wait_wakes_on_the_next_event_and_times_out_without_one() -> None:
    hub = EventHub()
    last = hub.last_id
    assert await hub.wait(last, 0.05) is False
    waiter = asyncio.ensure_future(hub.wait(last, 5.0))
    await asyncio.sleep(0.01)
    hub.removed([K[0]], "n0", TierKind.HOST, Reason.REMOVED)
    assert await asyncio.wait_for(waiter, 1.0) is True
