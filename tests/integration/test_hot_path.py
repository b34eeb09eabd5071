"""The hot path with real processes: the stream RPC (many calls in flight on one connection,
its hello refusing foreign or mismatched peers) and kept read grants (a hot block read
without a call, its lease counted by the master, a stale grant never returning wrong bytes)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.request

import msgpack
import numpy as np
import pytest

from clients.client import AsyncPoolClient
from kvpool import localcopy
from kvpool.errors import ChecksumMismatch
from kvpool.keys import Namespace, block_keys
from kvpool.protocol import Call
from kvpool.wire import PROTOCOL_VERSION
from tests.integration.conftest import ROOT, Pool, admin

KiB = 1 << 10
MiB = 1 << 20


def keys_for(tag: str, n: int) -> list[bytes]:
    return block_keys(Namespace("hotpath", "uint8", "raw", block_tokens=1, salt=tag), np.arange(n))


def counter(url: str, op: str) -> int:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = re.search(rf'kvpool_ops_total{{op="{op}"}} (\d+)', text)
    return int(found.group(1)) if found else 0


def stream_info(url: str) -> dict:
    with urllib.request.urlopen(url + "/v1/rpc/stream", timeout=10) as resp:
        return json.loads(resp.read())


def connect(url: str, over: str) -> socket.socket:
    """A raw connection to the stream RPC: its TCP port, or its local Unix socket."""
    info = stream_info(url)
    if over == "tcp":
        return socket.create_connection(("127.0.0.1", int(info["port"])), timeout=10)
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect("\0" + info["local"])
    return sock


def hello_answer(url: str, first: bytes, over: str = "tcp") -> dict:
    """What the stream RPC answers to ``first`` as a connection's opening bytes."""
    with connect(url, over) as sock:
        sock.sendall(first)
        unpacker = msgpack.Unpacker(raw=False)
        while True:
            data = sock.recv(65536)
            assert data, "the server hung up without saying why"
            unpacker.feed(data)
            for frame in unpacker:
                assert sock.recv(1) == b"", "the server kept a refused connection open"
                return frame


async def test_many_calls_in_flight_on_one_connection_each_get_their_answer(pool: Pool) -> None:
    ks = keys_for("inflight", 64)
    async with AsyncPoolClient(pool.client_config()) as client:
        await client.batch_put(ks[::2], [np.full(4 * KiB, i, np.uint8) for i in range(32)])
        answers = await asyncio.gather(*(client.exists(k) for k in ks * 4),
                                       *(client.match_prefix(ks[:n]) for n in range(1, 9)))
    assert answers[:256] == [i % 2 == 0 for i in range(64)] * 4
    assert answers[256:] == [1] * 8  # ks[1] is absent: every prefix stops after ks[0]


@pytest.mark.parametrize("over", ["tcp", "unix"])
def test_the_stream_port_refuses_a_foreign_or_mismatched_peer_and_keeps_serving(
        pool: Pool, over: str) -> None:
    older = hello_answer(pool.master_url, msgpack.packb({"kvpool": PROTOCOL_VERSION - 1}), over)
    assert older["error"] == "protocol_mismatch"
    assert f"protocol {PROTOCOL_VERSION}" in older["message"] and "upgrade" in older["message"]
    http = hello_answer(pool.master_url, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", over)
    assert http["error"] == "bad_request" and "hello" in http["message"]

    async def still_serves() -> bool:
        async with AsyncPoolClient(pool.client_config()) as client:
            return await client.exists(keys_for("refused", 1)[0])

    assert asyncio.run(still_serves()) is False


async def test_a_client_on_the_masters_host_calls_over_its_local_socket(pool: Pool) -> None:
    """Same host, same network namespace, no TLS: the stream RPC skips the TCP stack; the
    same calls answer alike on either, and TCP can be forced."""
    ks = keys_for("local", 8)
    name = stream_info(pool.master_url)["local"]
    assert name.startswith("kvpool-rpc-") and len(name) > 30  # drawn at random, per start
    async with AsyncPoolClient(pool.client_config()) as local, \
            AsyncPoolClient(pool.client_config(rpc_socket="tcp")) as tcp:
        assert local.rpc_over == tcp.rpc_over == ""  # nothing opened yet
        await local.batch_put(ks[:4], [np.full(4 * KiB, i, np.uint8) for i in range(4)])
        assert local.rpc_over == "unix"
        assert await tcp.batch_exists(ks) == [True] * 4 + [False] * 4
        assert tcp.rpc_over == "tcp"
        assert await local.match_prefix(ks) == 4
        out = np.empty(4 * KiB, np.uint8)
        assert await tcp.get(ks[2], out) is not None and (out == 2).all()


async def test_a_hot_block_is_read_again_without_asking_the_master(pool: Pool) -> None:
    key = keys_for("hot", 1)[0]
    value = np.random.default_rng(3).integers(0, 256, 64 * KiB, dtype=np.uint8)
    async with AsyncPoolClient(pool.client_config()) as client:
        await client.put(key, value)
        before = counter(pool.master_url, "get_hits")
        for _ in range(20):
            out = np.zeros_like(value)
            assert await client.get(key, out) is not None
            assert np.array_equal(out, value)
        # the first two reads ask (the second keeps its grant), the other 18 do not
        assert counter(pool.master_url, "get_hits") - before == 2
        status, block = admin(pool.master_url, f"/v1/blocks/{key.hex()}")
        assert status == 200 and block["leases"] == 1  # the kept grant's lease, counted
    status, block = admin(pool.master_url, f"/v1/blocks/{key.hex()}")
    assert block["leases"] == 0  # closing the client handed it back


async def test_kept_grants_and_their_leases_stay_bounded(pool: Pool) -> None:
    ks = keys_for("bounded", 40)
    async with AsyncPoolClient(pool.client_config(hot_grants=8)) as client:
        await client.batch_put(ks, [np.full(4 * KiB, i, np.uint8) for i in range(40)])
        out = np.zeros(4 * KiB, np.uint8)
        for _ in range(2):
            for k in ks:
                assert await client.get(k, out) is not None
        await client.exists(ks[0])  # released leases ride on the next call
        leased = [admin(pool.master_url, f"/v1/blocks/{k.hex()}")[1]["leases"] for k in ks]
        assert sum(leased) == 8 and leased[-8:] == [1] * 8  # the 8 most recently read


async def test_a_stale_kept_grant_never_returns_the_bytes_now_at_its_location(pool: Pool) -> None:
    """A forced remove ignores leases; the freed space takes another block. The reader's
    kept grant then points at that block's bytes: their checksum fails, the get asks the
    master again and reports a miss, and the other block is not blamed."""
    old, *news = keys_for("stale", 21)
    value = np.full(64 * KiB, 7, np.uint8)
    async with AsyncPoolClient(pool.client_config()) as reader, \
            AsyncPoolClient(pool.client_config()) as writer:
        await writer.put(old, value)
        out = np.zeros_like(value)
        for _ in range(2):
            assert await reader.get(old, out) is not None  # the second keeps the grant
        where = admin(pool.master_url, f"/v1/blocks/{old.hex()}")[1]["replicas"][0]["location"]
        await writer.remove(old, force=True)
        for i, new in enumerate(news):
            await writer.put(new, np.full(64 * KiB, 100 + i, np.uint8))
            if admin(pool.master_url, f"/v1/blocks/{new.hex()}")[1]["replicas"][0]["location"] == where:
                break
        else:
            raise AssertionError("no new block took the freed space")
        before = counter(pool.master_url, "get_hits") + counter(pool.master_url, "get_misses")
        assert await reader.get(old, out) is None
        assert counter(pool.master_url, "get_hits") + counter(pool.master_url, "get_misses") == before + 1
        assert await reader.get(new, out) is not None and (out == 100 + i).all()
        await writer.batch_remove([new] + news[:i], force=True)


@pytest.mark.parametrize("size", [64 * KiB, 16 * MiB])
async def test_bytes_damaged_in_the_arena_are_caught_whole_or_hashed_in_pieces(
        pool: Pool, size: int) -> None:
    """A 16 MiB block is verified piece by piece as it lands, a 64 KiB one at once: either
    way one damaged page in the middle of the arena copy is a ChecksumMismatch, never bytes."""
    key = keys_for(f"damaged-{size}", 1)[0]
    value = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    async with AsyncPoolClient(pool.client_config(hot_grants=0)) as client:
        await client.put(key, value)
        lease, [grant], _ = await client._lease([key])  # where the bytes are, as a get sees it
        loc = grant.location
        await client._peers([loc.agent])
        junk = np.full(4 * KiB, 0x5A, np.uint8)
        client.register(junk)
        await client.agent.run("WRITE", loc.agent, [(junk.ctypes.data, junk.nbytes, 0)], "DRAM",
                               [(loc.address + size // 2, junk.nbytes, loc.device)], "DRAM", 5.0)
        await client._call(Call.RELEASE, {"leases": [lease]})
        out = np.zeros(size, np.uint8)
        with pytest.raises(ChecksumMismatch):
            await client.get(key, out)
        assert not await client.exists(key)  # the replica was reported and dropped


async def test_what_one_data_path_writes_the_other_reads(pool: Pool) -> None:
    sizes = [4 * KiB, 64 * KiB, MiB, 16 * MiB]
    rng = np.random.default_rng(11)
    for writer_path, reader_path in (("nixl", "same-host"), ("same-host", "nixl")):
        ks = keys_for(f"paths-{writer_path}", len(sizes))
        values = [rng.integers(0, 256, n, dtype=np.uint8) for n in sizes]
        async with AsyncPoolClient(pool.client_config(data_path=writer_path)) as writer, \
                AsyncPoolClient(pool.client_config(data_path=reader_path)) as reader:
            assert all(r.stored for r in await writer.batch_put(ks, values))
            outs = [np.zeros_like(v) for v in values]
            assert all(r.hit for r in await reader.batch_get(ks, outs))
            assert all(np.array_equal(o, v) for o, v in zip(outs, values))
            one = np.zeros(MiB, np.uint8)
            assert await reader.get(ks[2], one) is not None and np.array_equal(one, values[2])
            await writer.batch_remove(ks, force=True)
    # the same-host side copied through the daemon's arena mapped here, not the kernel
    assert localcopy.mapped(pool.procs["daemon"].pid)


NAMESPACED_CLIENT = """
import asyncio, sys, numpy as np
from clients.client import AsyncPoolClient
from kvpool import localcopy
from kvpool.config import ClientConfig
from kvpool.errors import TransferFailed

async def main():
    key = bytes.fromhex(sys.argv[2])
    async with AsyncPoolClient(ClientConfig(master_url=sys.argv[1])) as c:
        _, [grant], _ = await c._lease([key])
        out = np.zeros(64 << 10, np.uint8)
        assert await c.get(key, out) is not None
        print(localcopy.local_pid(grant.location.agent), int(out.sum()))
    async with AsyncPoolClient(ClientConfig(master_url=sys.argv[1], data_path="same-host")) as c:
        try:
            await c.get(key, out)
        except TransferFailed as exc:
            print("refused:", exc)
asyncio.run(main())
"""


def test_a_client_in_another_process_namespace_takes_nixl(pool: Pool) -> None:
    """Seen from another PID namespace (a container on the same host), the daemon's
    process is not there: the client copies through NIXL, and a forced same-host path is
    refused with a typed error."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare(1) to start a process in a new PID namespace")
    key = keys_for("pidns", 1)[0]
    value = np.full(64 * KiB, 3, np.uint8)

    async def put() -> None:
        async with AsyncPoolClient(pool.client_config()) as client:
            await client.put(key, value)

    asyncio.run(put())
    res = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c",
                          NAMESPACED_CLIENT, pool.master_url, key.hex()],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    first, second = res.stdout.strip().splitlines()
    assert first == f"None {int(value.sum())}"  # no local daemon: NIXL, and the right bytes
    assert second.startswith("refused:") and "same-host" in second


def agents_calls(url: str) -> int:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = re.search(r'kvpool_master_call_seconds_count{call="agents"} (\d+)', text)
    return int(float(found.group(1))) if found else 0


async def test_a_client_that_connects_ahead_asks_nothing_more_at_its_first_put(pool: Pool) -> None:
    """An engine connects as it starts: to the master and to every daemon's NIXL agent,
    and maps the arena of a daemon on its host, so that its first put or get does not wait
    for any of it."""
    [key] = keys_for("ahead", 1)
    value = np.full(64 * KiB, 3, np.uint8)
    daemon = pool.procs["daemon"].pid
    localcopy.forget(daemon)  # as in a process that never copied with it
    async with AsyncPoolClient(pool.client_config()) as client:
        assert await client.connect() == 1  # the pool's one daemon
        assert localcopy.mapped(daemon)
        before = agents_calls(pool.master_url)
        assert (await client.put(key, value)).stored
        out = np.zeros_like(value)
        assert await client.get(key, out) is not None and np.array_equal(out, value)
        assert agents_calls(pool.master_url) == before
    async with AsyncPoolClient(pool.client_config()) as cold:  # without: the first put asks
        before = agents_calls(pool.master_url)
        assert await cold.get(key, out) is not None
        assert agents_calls(pool.master_url) == before + 1
