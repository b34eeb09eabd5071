"""Draining a node of a live pool (a master and two daemons as processes): the node takes
no new blocks, its blocks in the host arena and on SSD move to the other node, a reader's
lease on it is waited for, `kvpool drain --wait` reports it can be stopped, and once it
is stopped every block still reads back, bit for bit."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

from clients.client import AsyncPoolClient
from kvpool.config import ClientConfig
from kvpool.keys import Namespace, block_keys
from kvpool.launcher import spawn, stop
from tests.integration.conftest import ROOT, admin, master_check, wait_for

BLOCK = 64 * 1024
NS = Namespace("drain-model", "float16", "test-layout", block_tokens=4)
MASTER_ENV = {"KVPOOL_MASTER_SWEEP_INTERVAL_S": "0.2", "KVPOOL_MASTER_READ_LEASE_S": "6",
              "KVPOOL_MASTER_PUT_TIMEOUT_S": "3"}
DAEMON_ENV = {"KVPOOL_DAEMON_HOST_BYTES": "8MiB", "KVPOOL_DAEMON_SSD_BYTES": "64MiB",
              "KVPOOL_DAEMON_OBJECT_BYTES": "0", "KVPOOL_DAEMON_HEARTBEAT_S": "0.5",
              "KVPOOL_DAEMON_NODE_TTL_S": "3"}


class TwoNodes:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen] = {}
        proc, info = spawn("kvpool", ["master", "--port", "0"], MASTER_ENV, tmp / "master.log")
        self.procs["master"], self.master = proc, info["master"]
        def daemon(node: str) -> subprocess.Popen:
            return spawn("kvpool", ["daemon", "--master", self.master, "--node-id", node,
                                    "--data-dir", str(tmp / node)], DAEMON_ENV,
                         tmp / f"{node}.log")[0]

        with ThreadPoolExecutor(2) as starting:  # the two start side by side
            for node, started in zip(("node0", "node1"), starting.map(daemon, ("node0", "node1"))):
                self.procs[node] = started
        wait_for(lambda: len(self.nodes()) == 2, 30, "both daemons to join")

    def nodes(self) -> dict[str, dict]:
        return {n["node_id"]: n for n in admin(self.master, "/v1/nodes")[1]["nodes"]}

    def client(self) -> AsyncPoolClient:
        return AsyncPoolClient(ClientConfig(master_url=self.master, timeout_s=20.0))

    def kvpool(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kvpool", *args, "--master", self.master],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)

    def stop(self) -> None:
        for name in list(self.procs)[::-1]:
            stop(self.procs.pop(name))


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TwoNodes]:
    """One pool for the module: the undrain test runs first, the drain that stops node0 last."""
    p = TwoNodes(tmp_path_factory.mktemp("drain"))
    try:
        yield p
    finally:
        p.stop()


def payloads(n: int, tag: int) -> list[np.ndarray]:
    rng = np.random.default_rng(tag)
    return [rng.integers(0, 256, BLOCK, dtype=np.uint8) for _ in range(n)]


def chain(n: int, tag: int) -> list[bytes]:
    return block_keys(NS, [tag * 10_000 + i for i in range(n * NS.block_tokens)])


async def put(pool: TwoNodes, keys: list[bytes], values: list[np.ndarray], node: str) -> None:
    async with pool.client() as c:
        await c.batch_put(keys, values, chained=True, namespace=NS, prefer_node=node)


def replicas(pool: TwoNodes, key: bytes) -> list[tuple[str, str]]:
    status, block = admin(pool.master, f"/v1/blocks/{key.hex()}")
    assert status == 200, block
    return [(r["node"], r["tier"]) for r in block["replicas"]]


def test_drain_refuses_unknown_node_and_undrain_takes_blocks_again(pool: TwoNodes) -> None:
    status, err = admin(pool.master, "/v1/nodes/nope/drain", "POST", {})
    assert status == 404 and err["error"] == "node_not_found" and "node0" in err["message"], err
    status, err = admin(pool.master, "/v1/nodes/node0/drain", "POST", {"timeout_s": "soon"})
    assert status == 400, err
    assert admin(pool.master, "/v1/nodes/node0/drain", "POST", {})[0] == 202
    wait_for(lambda: pool.nodes()["node0"]["state"] == "drained", 60, "an empty node to drain")
    cli = pool.kvpool("drain", "node0", "--cancel")
    assert cli.returncode == 0 and "active" in cli.stdout, cli.stdout + cli.stderr
    keys, values = chain(2, 9), payloads(2, 9)
    asyncio.run(put(pool, keys, values, "node0"))
    assert all(r[0] == "node0" for k in keys for r in replicas(pool, k))
    out = pool.kvpool("block", keys[0].hex())
    assert out.returncode == 0 and "node0" in out.stdout and "active" in out.stdout, out.stdout
    bad = pool.kvpool("block", "xyz")
    assert bad.returncode == 2 and "32 hex" in bad.stderr


def test_drained_node_is_stopped_and_no_block_is_lost(pool: TwoNodes) -> None:
    cold_keys, cold = chain(24, 1), payloads(24, 1)
    hot_keys, hot = chain(24, 2), payloads(24, 2)
    asyncio.run(put(pool, cold_keys, cold, "node0"))
    # Every host arena demoted to SSD: node0's first chain now lives on its SSD only.
    status, _ = admin(pool.master, "/v1/evict", "POST", {"tier": "host", "fill": 0.0})
    assert status == 200
    asyncio.run(put(pool, hot_keys, hot, "node0"))
    assert {replicas(pool, k)[0] for k in cold_keys} == {("node0", "ssd")}
    assert {replicas(pool, k)[0] for k in hot_keys} == {("node0", "host")}

    async def read_and_hold() -> tuple[AsyncPoolClient, int]:
        """A reader that got a block and has not released its lease yet (a decode in flight)."""
        c = pool.client()
        await c.__aenter__()
        out = np.empty(BLOCK, np.uint8)
        assert await c.get(hot_keys[0], out) is not None
        return c, 0

    # What node0 holds now: these chains, and what the policy kept of the undrain test's
    # two blocks when the host arena was emptied (it may evict rather than demote a block).
    earlier = [(k, v) for k, v in zip(chain(2, 9), payloads(2, 9))
               if admin(pool.master, f"/v1/blocks/{k.hex()}")[0] == 200]
    held = sum(t["blocks"] for t in pool.nodes()["node0"]["tiers"])
    assert held == 48 + len(earlier)
    loop = asyncio.new_event_loop()
    reader, _ = loop.run_until_complete(read_and_hold())
    try:
        status, started = admin(pool.master, "/v1/nodes/node0/drain", "POST", {"timeout_s": 60})
        assert status == 202 and started["state"] == "draining", started
        # A new block goes to node1 though node0 is preferred: node0 takes no new blocks.
        new_keys, new = chain(2, 3), payloads(2, 3)
        asyncio.run(put(pool, new_keys, new, "node0"))
        assert all(r[0] == "node1" for k in new_keys for r in replicas(pool, k))
        # The leased block keeps its node0 replica while the lease is held (read lease 6 s).
        wait_for(lambda: admin(pool.master, "/v1/nodes/node0/drain")[1]["waiting_leases"] >= 1
                 or admin(pool.master, "/v1/nodes/node0/drain")[1]["state"] != "draining",
                 20, "the drain to wait for the reader's lease")
        waiting = admin(pool.master, "/v1/nodes/node0/drain")[1]
        assert waiting["state"] == "draining", waiting
        assert ("node0", "host") in replicas(pool, hot_keys[0])
        assert ("node1", "host") in replicas(pool, hot_keys[0])  # the copy landed first
        cli = pool.kvpool("drain", "node0", "--wait", "--interval", "0.3")
    finally:
        loop.run_until_complete(reader.__aexit__(None, None, None))
        loop.close()
    assert cli.returncode == 0, cli.stdout + cli.stderr
    assert "drained" in cli.stdout and "stop its daemon now" in cli.stdout, cli.stdout
    status_out = pool.kvpool("status", "--json")
    nodes = {n["node_id"]: n for n in json.loads(status_out.stdout)["nodes"]}
    assert nodes["node0"]["state"] == "drained" and nodes["node0"]["can_stop"]
    assert nodes["node0"]["moved"] == held and nodes["node0"]["left"] == 0, nodes["node0"]
    assert sum(t["blocks"] for t in nodes["node0"]["tiers"]) == 0
    table = pool.kvpool("status").stdout
    assert "node0 is drained" in table, table
    master_check(pool.master)  # index, allocators and both inventories agree

    stop(pool.procs.pop("node0"))
    wait_for(lambda: set(pool.nodes()) == {"node1"}, 20, "node0 to leave")

    earlier_values = [v for _, v in earlier]

    async def read_all() -> None:
        async with pool.client() as c:
            for keys, values in ((cold_keys, cold), (hot_keys, hot), (new_keys, new),
                                 ([k for k, _ in earlier], earlier_values)):
                if values is not earlier_values:  # whole chains: the prefix matches in full
                    assert await c.match_prefix(keys) == len(keys)
                for key, value in zip(keys, values):
                    out = np.empty(BLOCK, np.uint8)
                    assert await c.get(key, out) is not None, key.hex()
                    assert np.array_equal(out, value), key.hex()

    asyncio.run(read_all())
    master_check(pool.master)


def test_the_last_node_drains_into_the_shared_object_tier(tmp_path: Path) -> None:
    """With no other node to take them, blocks go to the object store the node names; a
    daemon started after it (naming the same store) serves every one of them."""
    env = {**DAEMON_ENV, "KVPOOL_DAEMON_OBJECT_BYTES": "64MiB",
           "KVPOOL_DAEMON_OBJECT_URL": f"file://{tmp_path / 'objects'}"}
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["master"], info = spawn("kvpool", ["master", "--port", "0"], MASTER_ENV,
                                      tmp_path / "master.log")
        master = info["master"]
        procs["node0"], _ = spawn("kvpool", ["daemon", "--master", master, "--node-id", "node0",
                                             "--data-dir", str(tmp_path / "node0")], env,
                                  tmp_path / "node0.log")
        keys, values = chain(8, 5), payloads(8, 5)

        async def write_then_read(check: bool) -> None:
            async with AsyncPoolClient(ClientConfig(master_url=master, timeout_s=20.0)) as c:
                if not check:
                    await c.batch_put(keys, values, chained=True, namespace=NS)
                    return
                for key, value in zip(keys, values):
                    out = np.empty(BLOCK, np.uint8)
                    assert await c.get(key, out) is not None and np.array_equal(out, value)

        asyncio.run(write_then_read(False))
        assert admin(master, "/v1/nodes/node0/drain", "POST", {"timeout_s": 30})[0] == 202
        nodes = lambda: {n["node_id"]: n for n in admin(master, "/v1/nodes")[1]["nodes"]}  # noqa: E731
        wait_for(lambda: nodes()["node0"]["state"] == "drained", 60, "node0 to drain")
        for key in keys:
            block = admin(master, f"/v1/blocks/{key.hex()}")[1]
            assert [(r["tier"], r["node_state"]) for r in block["replicas"]] == [("object", "shared")]
        stop(procs.pop("node0"))
        wait_for(lambda: not nodes(), 20, "node0 to leave")
        procs["node1"], _ = spawn("kvpool", ["daemon", "--master", master, "--node-id", "node1",
                                             "--data-dir", str(tmp_path / "node1")], env,
                                  tmp_path / "node1.log")
        wait_for(lambda: "node1" in nodes(), 30, "node1 to join")
        asyncio.run(write_then_read(True))
        master_check(master)
    finally:
        for proc in list(procs.values())[::-1]:
            stop(proc)
