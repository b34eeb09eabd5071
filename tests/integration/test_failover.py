"""What a failover must not forget, with real processes in cluster mode (real etcd):
pins (recorded on the daemons that hold the blocks), the protection of read leases the
former leader granted, blocks' replica counts (copied again after a node is lost), and
that the daemons fence a deposed leader off."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any, Iterator

import pytest

from clients.client import AsyncPoolClient
from kvpool.codec import make_header
from kvpool.daemon_link import RpcDaemonLink, StoredBlock, probe, whole_inventory
from kvpool.errors import NotLeader
from kvpool.etcd_coordinator import EtcdCoordinator
from kvpool.keyspace import Keyspace
from kvpool.tiers.base import TierKind
from tests.integration.cluster import TTL, Cluster, make_cluster
from tests.integration.conftest import admin
from tests.integration.test_cluster import assert_intact, blocks

READ_LEASE_S = 4.0  # short, so the test can outwait the leases a dead leader granted
PAGE = 16  # blocks per inventory page: every rebuild here reads several pages per node


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = make_cluster(tmp_path_factory.mktemp("failover"), masters=2, daemons=3,
                     master_env={"KVPOOL_MASTER_READ_LEASE_S": str(READ_LEASE_S),
                                 "KVPOOL_MASTER_INVENTORY_PAGE": str(PAGE)})
    try:
        yield c
        c.check()
    finally:
        c.stop()


def block_info(cluster: Cluster, key: bytes) -> dict[str, Any]:
    status, body = admin(cluster.wait_leader().url, f"/v1/blocks/{key.hex()}")
    assert status == 200, body
    return body


def tiers(cluster: Cluster, key: bytes) -> set[str]:
    return {r["tier"] for r in block_info(cluster, key)["replicas"]}


def evict_host(cluster: Cluster) -> None:
    status, body = admin(cluster.wait_leader().url, "/v1/evict", "POST", {"tier": "host", "fill": 0.0})
    assert status == 200, body


async def kill_the_leader(cluster: Cluster) -> tuple[str, str]:
    """SIGKILL the leader and wait for another to lead: (the killed one, the new one)."""
    old = cluster.wait_leader_name()
    await asyncio.to_thread(cluster.kill, old, signal.SIGKILL)
    for _ in range(100):
        if cluster.leader_name() not in (None, old):
            break
        await asyncio.sleep(0.1)
    new = await asyncio.to_thread(cluster.wait_leader_name, TTL + 8)
    assert new != old
    return old, new


async def test_pins_survive_the_leader_and_the_new_leader_moves_nothing_a_lease_may_hold(
        cluster: Cluster) -> None:
    (hard, soft, plain), values = blocks(3)
    async with AsyncPoolClient(cluster.client_config()) as client:
        await client.batch_put([hard, soft, plain], values, prefer_node="node0")
        assert await client.pin([hard]) == 1
        assert await client.pin([hard]) == 1  # counted: two pins need two unpins
        assert await client.pin([soft], ttl_s=600) == 1
        await client.batch_get([plain], [values[2].copy()])  # a lease the new leader never saw

        old, _ = await kill_the_leader(cluster)
        elected = time.monotonic()

        assert block_info(cluster, hard)["pins"] == 2
        assert block_info(cluster, soft)["soft_pinned"] is True
        assert block_info(cluster, plain)["pins"] == 0
        # Within a read lease's length of the election nothing moves, however pressed:
        # a reader of the former leader may still be reading it.
        evict_host(cluster)
        if time.monotonic() - elected < READ_LEASE_S - 1.0:
            assert tiers(cluster, plain) == {"host"}
        await asyncio.sleep(max(0.0, READ_LEASE_S + 0.5 - (time.monotonic() - elected)))
        evict_host(cluster)
        assert tiers(cluster, plain) == {"ssd"}  # unpinned: demoted under pressure
        assert tiers(cluster, hard) == {"host"}  # hard-pinned: stays, through the failover

        assert await client.unpin([hard]) == 1
        evict_host(cluster)
        assert tiers(cluster, hard) == {"host"}  # one pin is still held
        assert await client.unpin([hard]) == 1
        evict_host(cluster)
        assert tiers(cluster, hard) == {"ssd"}
        await assert_intact(client, [hard, soft, plain], values)
    cluster.start_master(old)  # back as a standby
    cluster.check()


async def test_a_block_that_lost_a_copy_with_its_node_gets_back_to_its_replica_count(
        cluster: Cluster) -> None:
    keys, values = blocks(6)
    async with AsyncPoolClient(cluster.client_config()) as client:
        placed = await client.batch_put(keys, values, prefer_node="node2", replicas=2)
        assert [p.replicas for p in placed] == [2] * len(keys)
        assert all("node2" in {r["node"] for r in block_info(cluster, k)["replicas"]} for k in keys)

        await asyncio.to_thread(cluster.kill, "node2", signal.SIGKILL)
        await asyncio.to_thread(cluster.wait_nodes, {"node0", "node1"}, TTL + 5)
        deadline = time.monotonic() + 10.0
        while True:
            holders = [{r["node"] for r in block_info(cluster, k)["replicas"]} for k in keys]
            if all(h == {"node0", "node1"} for h in holders) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert all(h == {"node0", "node1"} for h in holders), holders
        cluster.check()
        await assert_intact(client, keys, values)
    cluster.start_daemon("node2")
    await asyncio.to_thread(cluster.wait_nodes, {"node0", "node1", "node2"})


async def test_a_new_leader_rebuilds_inventories_larger_than_a_page(cluster: Cluster) -> None:
    keys, values = blocks(5 * PAGE + 3)
    async with AsyncPoolClient(cluster.client_config()) as client:
        await client.batch_put(keys, values, prefer_node="node1")
        assert await client.pin(keys[-1:]) == 1  # its pin travels in the last page
        old, new = await kill_the_leader(cluster)
        assert all(await client.batch_exists(keys))
        assert block_info(cluster, keys[-1])["pins"] == 1
        await assert_intact(client, keys, values)
        log = cluster.procs[new].log.read_text()
        joined = [line for line in log.splitlines() if "node node1 joined" in line][-1]
        pages = int(joined.rsplit(" in ", 1)[1].split()[0])
        assert pages >= (5 * PAGE + 3) // PAGE, joined  # node1 holds all these, and maybe more
        assert await client.unpin(keys[-1:]) == 1
    cluster.start_master(old)  # back as a standby
    cluster.check()  # the check reads every inventory in pages too


async def test_a_deposed_leader_s_calls_are_refused_by_the_daemons_the_new_leader_has_been_to(
        cluster: Cluster) -> None:
    """etcd can end a leader's lease before its TTL (etcd-io/etcd#15247: a raft leader
    that resumes from a pause revokes every lease), so a deposed master may go on believing
    it leads. Its calls carry its leader generation, counted in etcd per term; a daemon
    refuses one older than the newest it has heard from, so nothing the deposed master
    records there after the new leader took the daemon's inventory in is kept unseen."""
    coord = EtcdCoordinator(cluster.etcd_endpoint)
    key, url = Keyspace(cluster.cluster).generation, cluster.url("node0")
    before = int(await coord.get(key) or b"0")
    assert before >= 1
    link = RpcDaemonLink(url, generation=before)  # what the leader of now holds
    leader = RpcDaemonLink(url)  # given the new leader's generation below
    try:
        agent = (await link.registration()).agent  # admitted: no newer leader came yet
        old, _ = await kill_the_leader(cluster)
        await asyncio.to_thread(cluster.wait_nodes, {"node0", "node1", "node2"})
        after = int(await coord.get(key) or b"0")
        assert after > before

        (k,), (value,) = blocks(1)
        header = make_header(value, "uint8").encode()
        with pytest.raises(NotLeader, match=f"generation {before}.*generation {after}"):
            await link.adopt([StoredBlock(k, TierKind.HOST, 0, value.nbytes, header)])
        with pytest.raises(NotLeader):
            await link.drop(TierKind.HOST, [k])
        leader.generation = after
        listed = await whole_inventory(leader)
        assert k not in {b.key for b in listed}  # the deposed master's record was not made
        assert await probe(url, agent)  # probes lead nothing: not fenced

        # The new leader's own calls pass: a put through it lands and reads back.
        async with AsyncPoolClient(cluster.client_config()) as client:
            await client.batch_put([k], [value], prefer_node="node0")
            await assert_intact(client, [k], [value])
    finally:
        await link.close()
        await leader.close()
        await coord.close()
    cluster.start_master(old)  # back as a standby
    cluster.check()
