"""Cluster mode with a real etcd server: two masters (one leads), daemons on their own
ports and data folders, all separate processes; every test ends with the leader's check()."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from clients.client import AsyncPoolClient
from kvpool.config import ClientConfig
from kvpool.errors import KVPoolError
from tests.integration.cluster import DAEMON_ENV, TTL, Cluster, make_cluster
from tests.integration.conftest import ROOT, admin

BLOCK = 64 << 10


def blocks(n: int) -> tuple[list[bytes], list[np.ndarray]]:
    keys = [os.urandom(16) for _ in range(n)]
    return keys, [np.frombuffer(os.urandom(BLOCK), dtype=np.uint8).copy() for _ in keys]


async def read_all(client: AsyncPoolClient, keys: list[bytes]) -> list[np.ndarray | None]:
    outs = [np.empty(BLOCK, np.uint8) for _ in keys]
    results = await client.batch_get(keys, outs)
    return [out if r.hit else None for out, r in zip(outs, results)]


async def assert_intact(client: AsyncPoolClient, keys: list[bytes], values: list[np.ndarray]) -> None:
    """Every block is there, with the bytes that were put."""
    got = await read_all(client, keys)
    missing = [k.hex() for k, g in zip(keys, got) if g is None]
    assert not missing, f"{len(missing)} of {len(keys)} blocks are missing, e.g. {missing[0]}"
    assert all(np.array_equal(g, v) for g, v in zip(got, values)), "a block has wrong bytes"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, moto_server: str) -> Iterator[Cluster]:
    """Two masters, two daemons (tests add a third), an object tier shared through S3."""
    c = make_cluster(tmp_path_factory.mktemp("cluster"), masters=2, daemons=2,
                     s3_endpoint=moto_server)
    try:
        yield c
        c.check()
    finally:
        c.stop()


async def test_a_block_put_through_one_node_is_read_by_another_client(cluster: Cluster) -> None:
    keys, values = blocks(6)
    async with AsyncPoolClient(cluster.client_config()) as writer:
        await writer.batch_put(keys[:3], values[:3], prefer_node="node0")
        await writer.batch_put(keys[3:], values[3:], prefer_node="node1")
    leader = cluster.wait_leader().url
    placed = [admin(leader, f"/v1/blocks/{k.hex()}")[1]["replicas"][0]["node"] for k in keys]
    assert placed == ["node0"] * 3 + ["node1"] * 3
    spread_k, spread_v = blocks(8)  # no preference: by free bytes, so over both nodes
    async with AsyncPoolClient(cluster.client_config()) as writer:
        await writer.batch_put(spread_k, spread_v)
    spread = [admin(leader, f"/v1/blocks/{k.hex()}")[1]["replicas"][0]["node"] for k in spread_k]
    assert spread.count("node0") == spread.count("node1") == 4
    async with AsyncPoolClient(cluster.client_config()) as reader:
        await assert_intact(reader, keys, values)
    cluster.check()


def tiers_of(leader: str, keys: list[bytes]) -> set[tuple[str, str]]:
    return {(r["node"], r["tier"]) for k in keys
            for r in admin(leader, f"/v1/blocks/{k.hex()}")[1]["replicas"]}


async def test_a_dead_daemon_takes_only_its_lone_copies_and_brings_back_its_ssd(
        cluster: Cluster) -> None:
    cluster.start_daemon("node2")
    cluster.wait_nodes({"node0", "node1", "node2"})
    lone_k, lone_v = blocks(4)
    twin_k, twin_v = blocks(4)
    cold_k, cold_v = blocks(3)
    obj_k, obj_v = blocks(3)
    leader = cluster.wait_leader().url
    async with AsyncPoolClient(cluster.client_config()) as client:
        # Demoted by node2 into the shared object tier: they belong to no node from then on.
        await client.batch_put(obj_k, obj_v, prefer_node="node2")
        for tier in ("host", "ssd"):
            assert admin(leader, "/v1/evict", "POST", {"tier": tier, "fill": 0.0})[0] == 200
        assert {t for _, t in tiers_of(leader, obj_k)} == {"object"}
        assert not {n for n, _ in tiers_of(leader, obj_k)} & {"node0", "node1", "node2"}
        store = admin(leader, "/v1/cluster")[1]["tiers"]["object"]  # one store, counted once
        assert store["capacity"] == 256 << 20 and store["blocks"] >= len(obj_k)
        await client.batch_put(cold_k, cold_v, prefer_node="node2")
        assert admin(leader, "/v1/evict", "POST", {"tier": "host", "fill": 0.0})[0] == 200
        assert {admin(leader, f"/v1/blocks/{k.hex()}")[1]["replicas"][0]["tier"] for k in cold_k} == {"ssd"}
        await client.batch_put(lone_k, lone_v, prefer_node="node2")
        twins = await client.batch_put(twin_k, twin_v, prefer_node="node2", replicas=2)
        assert [r.replicas for r in twins] == [2] * 4
        holders = {r["node"] for k in twin_k for r in admin(leader, f"/v1/blocks/{k.hex()}")[1]["replicas"]}
        assert "node2" in holders and len(holders) > 1

        killed = time.monotonic()
        await asyncio.to_thread(cluster.kill, "node2", signal.SIGKILL)
        await asyncio.to_thread(cluster.wait_nodes, {"node0", "node1"}, TTL + 5)
        assert time.monotonic() - killed <= TTL + 2.0
        assert await read_all(client, lone_k + cold_k) == [None] * 7  # missing, never read from the dead
        await assert_intact(client, twin_k + obj_k, twin_v + obj_v)
        assert {n for n, t in tiers_of(leader, obj_k) if t == "host"} <= {"node0", "node1"}
        many = await client.batch_put(*blocks(1), replicas=5)
        assert many[0].replicas == 2  # best effort: two live nodes, two copies

        cluster.start_daemon("node2")  # same data folder: its SSD blocks come back
        await asyncio.to_thread(cluster.wait_nodes, {"node0", "node1", "node2"})
        await assert_intact(client, cold_k, cold_v)
    cluster.check()


async def test_a_client_given_every_master_url_finds_the_leader_without_etcd(cluster: Cluster) -> None:
    leader = cluster.wait_leader()
    standby = next(p for p in cluster.masters() if p is not leader)
    keys, values = blocks(2)
    cfg = ClientConfig(master_url=f"{standby.url},{leader.url}", timeout_s=10.0)
    async with AsyncPoolClient(cfg) as client:  # the standby answers NotLeader first
        await client.batch_put(keys, values)
        await assert_intact(client, keys, values)


def test_a_duplicate_daemon_id_is_refused(cluster: Cluster, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kvpool", "daemon", "--etcd", cluster.etcd_endpoint,
         "--cluster", cluster.cluster, "--node-id", "node0", "--data-dir", str(tmp_path / "dup")],
        cwd=ROOT, env={**os.environ, **DAEMON_ENV}, capture_output=True, timeout=60)
    assert proc.returncode != 0
    assert b"node id 'node0' is already in cluster" in proc.stderr, proc.stderr[-2000:]
    assert "node0" in cluster.nodes()  # the live one is untouched


async def test_a_daemon_restarted_at_once_waits_out_its_old_lease(cluster: Cluster) -> None:
    keys, values = blocks(3)
    leader = cluster.wait_leader().url
    async with AsyncPoolClient(cluster.client_config()) as client:
        await client.batch_put(keys, values, prefer_node="node1")
        assert admin(leader, "/v1/evict", "POST", {"tier": "host", "fill": 0.0})[0] == 200
        before = set(cluster.nodes())
        await asyncio.to_thread(cluster.kill, "node1", signal.SIGKILL)
        # Its key still lives for up to a TTL: the new daemon sees the old one is dead,
        # waits, and joins (a live holder would have been refused).
        started = time.monotonic()
        await asyncio.to_thread(cluster.start_daemon, "node1")
        assert time.monotonic() - started < TTL + 5
        await asyncio.to_thread(cluster.wait_nodes, before)
        await assert_intact(client, keys, values)
    cluster.check()


def test_a_daemon_pointed_at_a_cluster_master_without_etcd_is_told_to_use_etcd(
        cluster: Cluster, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "kvpool", "daemon", "--master", cluster.wait_leader().url,
         "--node-id", "stray", "--data-dir", str(tmp_path / "stray")],
        cwd=ROOT, env={**os.environ, **DAEMON_ENV}, capture_output=True, timeout=60)
    assert proc.returncode != 0
    assert b"start the daemon with --etcd" in proc.stderr, proc.stderr[-2000:]
    assert "stray" not in cluster.nodes()


async def test_killing_the_leader_under_load_loses_no_block(cluster: Cluster) -> None:
    if not cluster.running("node2"):
        cluster.start_daemon("node2")
        cluster.wait_nodes({"node0", "node1", "node2"})
    old = cluster.wait_leader_name()
    keys, values = blocks(40)
    orphan_k, orphan_v = blocks(3)
    async with AsyncPoolClient(cluster.client_config()) as client:
        # Objects that only their (then dead) writer knew: the new leader must find them
        # by listing the shared store.
        await client.batch_put(orphan_k, orphan_v, prefer_node="node2")
        for tier in ("host", "ssd"):
            assert admin(cluster.url(old), "/v1/evict", "POST", {"tier": tier, "fill": 0.0})[0] == 200
        await asyncio.to_thread(cluster.kill, "node2", signal.SIGKILL)
        await asyncio.to_thread(cluster.wait_nodes, {"node0", "node1"}, TTL + 5)
        await client.batch_put(keys, values)
        outcomes: list[str] = []
        wrong: list[bytes] = []
        stop = asyncio.Event()

        async def workload() -> None:
            i = 0
            while not stop.is_set():
                new_keys, new_values = blocks(2)
                try:
                    await client.batch_put(new_keys, new_values)
                    keys.extend(new_keys)
                    values.extend(new_values)
                    pick = [(i * 7) % len(keys), (i * 13) % len(keys)]
                    got = await read_all(client, [keys[j] for j in pick])
                    for j, g in zip(pick, got):
                        if g is not None and not np.array_equal(g, values[j]):
                            wrong.append(keys[j])
                    outcomes.append("ok")
                except KVPoolError as exc:
                    outcomes.append("retryable" if exc.retryable else f"FATAL {exc!r}")
                i += 1

        task = asyncio.create_task(workload())
        await asyncio.sleep(0.5)
        complete = list(zip(keys, values))  # every one of these is COMPLETE now
        killed_at = time.monotonic()
        await asyncio.to_thread(cluster.kill, old, signal.SIGKILL)
        new = await asyncio.to_thread(cluster.wait_leader_name, TTL + 8)
        took = time.monotonic() - killed_at
        await asyncio.sleep(1.0)
        stop.set()
        await task
        assert new != old
        assert took <= TTL + 2.0, f"the standby took {took:.1f}s to lead"
        got = await read_all(client, [k for k, _ in complete])
        lost = [k.hex() for (k, _), g in zip(complete, got) if g is None]
        assert not lost, f"{len(lost)} blocks complete before the kill are gone"
        assert all(np.array_equal(g, v) for (_, v), g in zip(complete, got))
        assert not wrong
        assert not [o for o in outcomes if o.startswith("FATAL")], outcomes
        assert outcomes.count("ok") > 5
        await assert_intact(client, orphan_k, orphan_v)
    cluster.start_master(old)  # back as a standby for the tests that follow
    cluster.start_daemon("node2")
    cluster.check()


async def test_the_cluster_recovers_from_an_etcd_restart_without_losing_a_block(
        cluster: Cluster) -> None:
    keys, values = blocks(12)
    async with AsyncPoolClient(cluster.client_config()) as client:
        await client.batch_put(keys[:6], values[:6])  # one copy each, in a host arena
        await client.batch_put(keys[6:], values[6:], replicas=2)
        nodes = cluster.nodes()
        await asyncio.to_thread(cluster.stop_etcd)
        await asyncio.sleep(TTL + 1.0)  # longer than every lease: they all fail to renew
        assert cluster.leader() is None  # no master serves without etcd behind it
        await asyncio.to_thread(cluster.start_etcd)  # same data folder, same port
        await asyncio.to_thread(cluster.wait_leader, 30)
        await asyncio.to_thread(cluster.wait_nodes, nodes, 30)
        await assert_intact(client, keys, values)
        more_k, more_v = blocks(3)
        assert all(r.stored for r in await client.batch_put(more_k, more_v))
        await assert_intact(client, more_k, more_v)
    cluster.check()
