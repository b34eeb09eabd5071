"""Put and get across processes: bytes, order, duplicates, prefixes, removal, pins."""

from __future__ import annotations

import asyncio
import json
import random
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from clients.client import AsyncPoolClient
from kvpool.errors import BlockLeased, BlockNotFound
from kvpool.keys import Namespace, block_keys
from tests.integration.conftest import ROOT, Pool, admin

KiB, MiB = 1 << 10, 1 << 20


def keys_for(tag: str, n: int) -> list[bytes]:
    return block_keys(Namespace("itest", "uint8", "raw", block_tokens=1, salt=tag), np.arange(n))


@pytest.mark.parametrize("size", [4 * KiB, 64 * KiB, 1 * MiB, 16 * MiB, 64 * MiB])
async def test_round_trip_sizes(pool: Pool, size: int) -> None:
    key = keys_for(f"size{size}", 1)[0]
    value = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
    async with AsyncPoolClient(pool.client_config()) as client:
        assert (await client.put(key, value)).stored
        out = np.zeros(size, dtype=np.uint8)
        header = await client.get(key, out)
        assert header is not None and header.payload_size == size
        assert np.array_equal(out, value)


async def test_tensors_and_float16_round_trip(pool: Pool) -> None:
    k1, k2 = keys_for("tensors", 2)
    t = torch.randn(4, 2, 256, 64, dtype=torch.bfloat16)
    a = np.random.default_rng(1).standard_normal((2, 512, 64)).astype(np.float16)
    async with AsyncPoolClient(pool.client_config()) as client:
        await client.batch_put([k1, k2], [t, a])
        t_out, a_out = torch.empty_like(t), np.empty_like(a)
        res = await client.batch_get([k1, k2], [t_out, a_out])
        assert [r.hit for r in res] == [True, True]
        assert torch.equal(t_out, t) and np.array_equal(a_out, a)
        assert res[0].header.dtype.name == "BFLOAT16" and res[0].header.shape == (4, 2, 256, 64)


async def test_batches_keep_their_order(pool: Pool) -> None:
    keys = keys_for("order", 40)
    values = [np.full(8 * KiB, i, dtype=np.uint8) for i in range(40)]
    async with AsyncPoolClient(pool.client_config()) as client:
        res = await client.batch_put(keys, values)
        assert all(r.stored for r in res) and [r.key for r in res] == keys
        order = list(range(40))
        random.Random(3).shuffle(order)
        outs = [np.zeros(8 * KiB, dtype=np.uint8) for _ in order]
        got = await client.batch_get([keys[i] for i in order], outs)
        assert [g.key for g in got] == [keys[i] for i in order]
        assert [int(o[0]) for o in outs] == order


async def test_get_bytes_returns_the_payload_or_none(pool: Pool) -> None:
    """The tools' read: the block's payload as bytes, by raw or hex key; a miss is None."""
    key, missing = keys_for("get_bytes", 2)
    value = np.random.default_rng(5).integers(0, 256, 96 * KiB, dtype=np.uint8)
    async with AsyncPoolClient(pool.client_config()) as client:
        await client.put(key, value)
        assert await client.get_bytes(key) == value.tobytes()
        assert await client.get_bytes(key.hex()) == value.tobytes()
        assert await client.get_bytes(missing) is None
        await client.remove(key)  # its read lease ended: the block may go
        assert await client.get_bytes(key) is None


async def test_putting_an_existing_key_keeps_the_first_value(pool: Pool) -> None:
    key = keys_for("dup", 1)[0]
    first = np.full(64 * KiB, 1, dtype=np.uint8)
    async with AsyncPoolClient(pool.client_config()) as client:
        assert (await client.put(key, first)).stored
        again = await client.put(key, np.full(64 * KiB, 2, dtype=np.uint8))
        assert not again.stored
        out = np.zeros(64 * KiB, dtype=np.uint8)
        assert await client.get(key, out) is not None
        assert np.array_equal(out, first)


async def test_match_prefix_counts_leading_present_keys(pool: Pool) -> None:
    keys = keys_for("prefix", 6)
    async with AsyncPoolClient(pool.client_config()) as client:
        assert await client.match_prefix(keys) == 0
        data = [np.full(4 * KiB, i, dtype=np.uint8) for i in range(6)]
        await client.batch_put(keys[:3] + keys[4:], data[:3] + data[4:], chained=False)
        assert await client.match_prefix(keys) == 3  # keys[3] is missing: the prefix stops
        assert await client.batch_exists(keys) == [True, True, True, False, True, True]
        await client.put(keys[3], data[3])
        assert await client.match_prefix(keys) == 6


async def test_remove_pin_and_misses(pool: Pool) -> None:
    key, other = keys_for("remove", 2)
    async with AsyncPoolClient(pool.client_config()) as client:
        await client.put(key, np.ones(4 * KiB, dtype=np.uint8))
        await client.pin([key])
        with pytest.raises(BlockLeased):
            await client.remove(key)
        await client.unpin([key])
        await client.remove(key)
        assert await client.get(key, np.zeros(4 * KiB, dtype=np.uint8)) is None
        with pytest.raises(BlockNotFound):
            await client.remove(other)
        with pytest.raises(BlockNotFound):
            await client.pin([other])


def test_another_process_reads_what_this_one_wrote(pool: Pool) -> None:
    key = keys_for("xproc", 1)[0]
    value = np.random.default_rng(9).integers(0, 256, 256 * KiB, dtype=np.uint8)
    from clients.sync import PoolClient

    with PoolClient(master_url=pool.master_url) as client:
        client.put(key, value)
    script = (
        "import sys, numpy as np, xxhash\n"
        "from clients.sync import PoolClient\n"
        f"with PoolClient(master_url={pool.master_url!r}) as c:\n"
        f"    out = np.zeros({256 * KiB}, np.uint8)\n"
        f"    assert c.get(bytes.fromhex({key.hex()!r}), out) is not None\n"
        "    print(xxhash.xxh3_64_hexdigest(out))\n")
    res = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    import xxhash

    assert res.stdout.strip() == xxhash.xxh3_64_hexdigest(value)


_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


def _bytes_near(cell: str, exact: int) -> bool:
    """``cell`` (``1.5 GiB``) names ``exact`` bytes to the one decimal it shows."""
    number, unit = cell.split()
    return abs(float(number) * _UNITS[unit] - exact) <= 0.05 * _UNITS[unit]


async def test_status_prints_the_tiers_the_master_reports(pool: Pool) -> None:
    async with AsyncPoolClient(pool.client_config()) as client:  # something in the pool to count
        await client.batch_put(keys_for("status", 3), [np.ones(256 * KiB, np.uint8)] * 3)
    res = subprocess.run([sys.executable, "-m", "kvpool", "status", "--master", pool.master_url],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    summary = admin(pool.master_url, "/v1/cluster")[1]
    nodes = admin(pool.master_url, "/v1/nodes")[1]["nodes"]
    title, header, rule, *lines = res.stdout.splitlines()
    assert title == (f"master {pool.master_url}: {summary['nodes']} node(s), {summary['blocks']} "
                     f"blocks, {summary['pending']} puts in flight")
    assert header.split() == ["node", "tier", "capacity", "used", "use", "watermarks", "blocks",
                              "compression", "state"]
    assert set(rule) == {"-", " "}
    rows = [re.split(r"\s{2,}", line.strip()) for line in lines]
    expected = [(n["node_id"], t) for n in nodes for t in n["tiers"]]
    assert [r[:2] for r in rows] == [[node, t["kind"]] for node, t in expected]
    for (node, t), (_, _, capacity, used, use, marks, blocks, ratio, state) in zip(expected, rows):
        assert state == "active"
        assert _bytes_near(capacity, t["capacity"]) and _bytes_near(used, t["used"]), (node, t)
        assert use == f"{100 * t['used'] / t['capacity']:.1f}%" and int(blocks) == t["blocks"]
        assert marks == f"{100 * t['low_watermark']:.0f}-{100 * t['high_watermark']:.0f}%"
        assert ratio == f"{t['compression']:.2f}x"
    by_tier: dict[str, list[int]] = {}
    for _, t in expected:
        by_tier.setdefault(t["kind"], []).append(int(t["blocks"]))
    # one node here: the per-tier rows add up to the cluster summary's tiers
    assert {k: sum(v) for k, v in by_tier.items()} == \
        {k: t["blocks"] for k, t in summary["tiers"].items()}
    assert sum(int(r[6]) for r in rows) >= 3 and summary["blocks"] >= 3
    res = subprocess.run([sys.executable, "-m", "kvpool", "status", "--json", "--master",
                          pool.master_url], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"cluster": summary, "nodes": nodes}


async def test_event_stream_reports_stored_and_removed_blocks(pool: Pool) -> None:
    import aiohttp

    key = keys_for("events", 1)[0]
    async with aiohttp.ClientSession() as session:
        async with session.get(pool.master_url + "/v1/events") as stream:
            assert stream.headers["Content-Type"].startswith("text/event-stream")

            async def next_event() -> dict:
                while True:
                    line = (await stream.content.readline()).decode()
                    if line.startswith("data: "):
                        return json.loads(line[6:])

            async with AsyncPoolClient(pool.client_config()) as client:
                await asyncio.sleep(2.5)  # the stream keeps delivering after idle periods
                await client.put(key, np.ones(4 * KiB, dtype=np.uint8))
                stored = await asyncio.wait_for(next_event(), 10)
                assert (stored["type"], stored["block_hashes"], stored["medium"]) == \
                    ("BlockStored", [key.hex()], "host")
                await client.remove(key)
                removed = await asyncio.wait_for(next_event(), 10)
                assert (removed["type"], removed["block_hashes"]) == ("BlockRemoved", [key.hex()])
                assert removed["id"] > stored["id"]
