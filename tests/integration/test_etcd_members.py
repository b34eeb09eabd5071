"""etcd as a cluster of three members, as production runs it: when the member a process
talks to dies, the process moves on to another member and nothing is lost."""

from __future__ import annotations

import asyncio
import shutil
import signal
from pathlib import Path

import pytest

from clients.client import AsyncPoolClient
from kvpool.launcher import LocalCluster
from kvpool.etcd_coordinator import EtcdCoordinator
from tests.integration.cluster import TTL, make_cluster
from tests.integration.test_cluster import assert_intact, blocks


async def test_a_coordinator_keeps_its_lease_and_keys_when_its_member_dies(tmp_path: Path) -> None:
    if shutil.which("etcd") is None:
        pytest.skip("needs an etcd server binary: apt-get install etcd-server")
    etcd = LocalCluster(tmp_path, etcd_members=3)
    await asyncio.to_thread(etcd.start_etcd)
    # long enough to ride out the raft election when the killed member led etcd
    coord = EtcdCoordinator(etcd.etcd_endpoint, timeout_s=6.0)
    try:
        lease = await coord.grant_lease(5)
        await coord.put("/kvpool/t/held", b"1", lease)
        first = coord.endpoint
        member = next(n for n, p in etcd.procs.items() if p.url == first)
        await asyncio.to_thread(etcd.kill, member, signal.SIGKILL)
        await coord.keepalive(lease)  # the lease lives in the etcd cluster, not the member
        assert await coord.get("/kvpool/t/held") == b"1"
        assert await coord.compare_and_set("/kvpool/t/new", None, b"2", lease)
        assert not await coord.compare_and_set("/kvpool/t/new", None, b"3", lease)
        assert coord.endpoint != first
    finally:
        await coord.close()
        etcd.stop_etcd()


async def test_the_pool_serves_on_when_an_etcd_member_dies(tmp_path: Path) -> None:
    cluster = make_cluster(tmp_path, masters=2, daemons=1, etcd_members=3)
    try:
        keys, values = blocks(6)
        async with AsyncPoolClient(cluster.client_config()) as client:
            await client.batch_put(keys, values)
            # Every process names the members in the same order, so all talk to etcd0.
            await asyncio.to_thread(cluster.kill, "etcd0", signal.SIGKILL)
            await asyncio.sleep(TTL + 1.0)  # past every lease that was not renewed elsewhere
            await asyncio.to_thread(cluster.wait_leader, 20)
            await asyncio.to_thread(cluster.wait_nodes, {"node0"}, 20)
            await assert_intact(client, keys, values)
            more_k, more_v = blocks(3)
            assert all(r.stored for r in await client.batch_put(more_k, more_v))
            await assert_intact(client, more_k, more_v)
        cluster.check()
    finally:
        cluster.stop()
