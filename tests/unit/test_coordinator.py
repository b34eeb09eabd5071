"""The in-process coordinator behaves like etcd for leases, watches and compare-and-set."""

from __future__ import annotations

import asyncio

import pytest

from kvpool.coordinator import EventKind, InProcessCoordinator, LeaseExpired


async def test_keys_and_compare_and_set() -> None:
    c = InProcessCoordinator()
    try:
        await c.put("/kvpool/a/x", b"1")
        await c.put("/kvpool/b/y", b"2")
        assert await c.get("/kvpool/a/x") == b"1"
        assert await c.get_prefix("/kvpool/a/") == {"/kvpool/a/x": b"1"}
        assert await c.compare_and_set("/kvpool/a/new", None, b"n")
        assert not await c.compare_and_set("/kvpool/a/new", None, b"m")
        assert not await c.compare_and_set("/kvpool/a/x", b"0", b"3")
        assert await c.get("/kvpool/a/x") == b"1"
        assert await c.compare_and_set("/kvpool/a/x", b"1", b"3")
        assert await c.delete("/kvpool/a/x") and not await c.delete("/kvpool/a/x")
    finally:
        await c.close()


async def test_leases_expire_renew_and_revoke() -> None:
    c = InProcessCoordinator()
    try:
        events = c.watch_prefix("/kvpool/n/")
        lease = await c.grant_lease(0.4)
        await c.put("/kvpool/n/node1", b"up", lease)
        assert (await asyncio.wait_for(anext(events), 1)).kind is EventKind.PUT
        for _ in range(4):  # renewed faster than its TTL, it stays
            await asyncio.sleep(0.2)
            await c.keepalive(lease)
        assert await c.get("/kvpool/n/node1") == b"up"
        event = await asyncio.wait_for(anext(events), 0.4 + 0.5)
        assert (event.kind, event.key) == (EventKind.DELETE, "/kvpool/n/node1")
        with pytest.raises(LeaseExpired):
            await c.keepalive(lease)
        other = await c.grant_lease(30)
        await c.put("/kvpool/n/node2", b"up", other)
        await c.put("/kvpool/elsewhere", b"x")
        await c.revoke(other)
        assert (await asyncio.wait_for(anext(events), 1)).kind is EventKind.PUT
        deleted = await asyncio.wait_for(anext(events), 1)
        assert (deleted.kind, deleted.key) == (EventKind.DELETE, "/kvpool/n/node2")
        await events.aclose()
    finally:
        await c.close()
