"""One suite for both coordinators: the in-process one and etcd behave alike for keys,
compare-and-set, leases and watches."""

from __future__ import annotations

import asyncio
import uuid
from typing import AsyncIterator

import pytest

from kvpool.coordinator import Coordinator, EventKind, InProcessCoordinator
from kvpool.errors import LeaseExpired
from kvpool.etcd_coordinator import EtcdCoordinator


@pytest.fixture(params=["inprocess", "etcd"])
async def coord(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Coordinator, float, str]]:
    """A coordinator, the shortest lease TTL it honours, and a fresh key prefix."""
    if request.param == "etcd":
        endpoint = request.getfixturevalue("etcd_server")
        c: Coordinator = EtcdCoordinator(endpoint)
        ttl = 2.0  # etcd leases count whole seconds
    else:
        c, ttl = InProcessCoordinator(), 0.4
    try:
        yield c, ttl, f"/kvpool/test-{uuid.uuid4().hex[:8]}/"
    finally:
        await c.close()


async def test_keys_and_compare_and_set(coord: tuple[Coordinator, float, str]) -> None:
    c, _, p = coord
    await c.put(p + "a/x", b"1")
    await c.put(p + "b/y", b"2")
    assert await c.get(p + "a/x") == b"1"
    assert await c.get(p + "missing") is None
    assert await c.get_prefix(p + "a/") == {p + "a/x": b"1"}
    assert await c.compare_and_set(p + "a/new", None, b"n")
    assert not await c.compare_and_set(p + "a/new", None, b"m")
    assert not await c.compare_and_set(p + "a/x", b"0", b"3")
    assert await c.get(p + "a/x") == b"1"
    assert await c.compare_and_set(p + "a/x", b"1", b"3")
    assert await c.get(p + "a/x") == b"3"
    assert await c.delete(p + "a/x") and not await c.delete(p + "a/x")


async def test_leases_expire_renew_and_revoke(coord: tuple[Coordinator, float, str]) -> None:
    c, ttl, p = coord
    watch = await c.watch_prefix(p + "n/")
    try:
        lease = await c.grant_lease(ttl)
        await c.put(p + "n/node1", b"up", lease)  # a watch sees events from its creation on
        event = await asyncio.wait_for(anext(watch), 5)
        assert (event.kind, event.key, event.value) == (EventKind.PUT, p + "n/node1", b"up")
        for _ in range(4):  # renewed faster than its TTL, it stays
            await asyncio.sleep(ttl / 2)
            await c.keepalive(lease)
        assert await c.get(p + "n/node1") == b"up"
        event = await asyncio.wait_for(anext(watch), ttl + 5)  # etcd expires leases lazily
        assert (event.kind, event.key) == (EventKind.DELETE, p + "n/node1")
        assert await c.get(p + "n/node1") is None
        with pytest.raises(LeaseExpired):
            await c.keepalive(lease)
        other = await c.grant_lease(30)
        await c.put(p + "n/node2", b"up", other)
        await c.put(p + "elsewhere", b"x")  # outside the watched prefix
        await c.revoke(other)
        assert (await asyncio.wait_for(anext(watch), 5)).kind is EventKind.PUT
        deleted = await asyncio.wait_for(anext(watch), 5)
        assert (deleted.kind, deleted.key) == (EventKind.DELETE, p + "n/node2")
    finally:
        await watch.aclose()


async def test_compare_and_set_with_a_lease_elects_one_leader(coord: tuple[Coordinator, float, str]) -> None:
    c, ttl, p = coord
    mine, theirs = await c.grant_lease(ttl), await c.grant_lease(ttl)
    assert await c.compare_and_set(p + "leader", None, b"me", mine)
    assert not await c.compare_and_set(p + "leader", None, b"them", theirs)
    await c.revoke(mine)
    assert await c.get(p + "leader") is None
    assert await c.compare_and_set(p + "leader", None, b"them", theirs)
