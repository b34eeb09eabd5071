"""Tiering against a real master and daemon: every tier between its watermarks through a
write storm, pins and leases that hold, soft pins that go last and expire, prefetch, and
cold-tier compression as the admin API reports it."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from clients.client import AsyncPoolClient
from kvpool.keys import Namespace, block_keys
from kvpool.wire import RpcClient
from tests.integration.conftest import Pool, admin, make_pool, wait_for

MiB = 1 << 20


def keys_for(tag: str, n: int) -> list[bytes]:
    return block_keys(Namespace("itest-tiering", "uint8", "raw", block_tokens=1, salt=tag), np.arange(n))


def noise(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, MiB, dtype=np.uint8)


def smooth(i: int) -> np.ndarray:
    ramp = np.linspace(0, 1, MiB // 2, dtype=np.float32) * (1 + i % 7)
    return ramp.astype(np.float16)


def tiers(pool: Pool) -> dict[str, dict]:
    node = admin(pool.master_url, "/v1/nodes")[1]["nodes"][0]
    return {t["kind"]: t for t in node["tiers"]}


def tiers_of(pool: Pool, key: bytes) -> set[str]:
    status, body = admin(pool.master_url, f"/v1/blocks/{key.hex()}")
    return {r["tier"] for r in body["replicas"]} if status == 200 else set()


def within_watermarks(pool: Pool) -> bool:
    return all(t["used"] <= t["high_watermark"] * t["capacity"] for t in tiers(pool).values())


async def test_a_write_storm_keeps_every_tier_under_its_high_watermark(tmp_path: Path) -> None:
    pool = make_pool(tmp_path, daemon_env={"KVPOOL_DAEMON_HOST_BYTES": "16MiB",
                                           "KVPOOL_DAEMON_SSD_BYTES": "24MiB",
                                           "KVPOOL_DAEMON_OBJECT_BYTES": "40MiB"},
                     master_env={"KVPOOL_MASTER_SSD_HIGH": "0.8", "KVPOOL_MASTER_SSD_LOW": "0.5"})
    keys = keys_for("storm", 122)
    rpc = RpcClient(pool.master_url)
    try:
        async with AsyncPoolClient(pool.client_config()) as client:
            await client.batch_put(keys[:2], [noise(0), noise(1)])
            assert await client.pin(keys[:1]) == 1
            await rpc.call("get", {"keys": [keys[1]]})  # a reader that never lets go (30 s lease)
            for start in range(2, len(keys), 8):
                await client.batch_put(keys[start:start + 8], [noise(i) for i in range(start, start + 8)])
            wait_for(lambda: within_watermarks(pool), 15, "every tier to come under its high watermark")
            seen = tiers(pool)
            assert seen["ssd"]["used"] <= 0.8 * seen["ssd"]["capacity"]
            assert all(t["used"] > 0 for t in seen.values()), seen  # the storm reached every tier
            placed = {i: tiers_of(pool, k) for i, k in enumerate(keys)}
            assert "host" in placed[0] and "host" in placed[1]  # pinned and leased stay put
            gone = [i for i, t in placed.items() if not t]
            assert gone and 0 not in gone and 1 not in gone  # the last tier evicted, not those
            hits = 0
            for i, k in enumerate(keys):  # whatever moved kept its bytes
                if placed[i]:
                    # Reading promotes into the host arena, which pushes other blocks down
                    # and out of the last tier: a miss is a block evicted meanwhile.
                    out = np.empty(MiB, np.uint8)
                    if await client.get(k, out) is not None:
                        assert np.array_equal(out, noise(i)), i
                        hits += 1
                    else:
                        assert not tiers_of(pool, k), i
            assert hits >= 40, hits
        pool.check()
    finally:
        await rpc.close()
        pool.stop()


async def test_soft_pins_go_after_every_unpinned_block_and_expire(tmp_path: Path) -> None:
    pool = make_pool(tmp_path, daemon_env={"KVPOOL_DAEMON_HOST_BYTES": "8MiB",
                                           "KVPOOL_DAEMON_SSD_BYTES": "0", "KVPOOL_DAEMON_OBJECT_BYTES": "0"})
    keys = keys_for("soft", 40)
    try:
        async with AsyncPoolClient(pool.client_config()) as client:
            await client.batch_put(keys[:4], [noise(i) for i in range(4)], chained=True)
            # The whole prefix of block 2 (blocks 0, 1, 2) is soft-pinned for 4 s.
            assert await client.pin(keys[2:3], ttl_s=4.0, prefix=True) == 3
            for i in range(4, 16):
                await client.put(keys[i], noise(i))
            present = await client.batch_exists(keys[:16])
            assert present[:3] == [True] * 3, present  # older than everything, still there
            assert not present[3] and not all(present[4:16]), present
            time.sleep(4.5)
            for i in range(16, 28):
                await client.put(keys[i], noise(i))
            assert await client.batch_exists(keys[:3]) == [False] * 3  # expired, then evicted
        pool.check()
    finally:
        pool.stop()


async def test_prefetch_promotes_matched_cold_blocks_before_the_get(tmp_path: Path) -> None:
    pool = make_pool(tmp_path)
    keys = keys_for("prefetch", 6)
    try:
        async with AsyncPoolClient(pool.client_config()) as client:
            await client.batch_put(keys, [smooth(i) for i in range(6)], chained=True)
            assert admin(pool.master_url, "/v1/evict", "POST", {"tier": "host", "fill": 0})[0] == 200
            assert all(tiers_of(pool, k) == {"ssd"} for k in keys)
            # Blocks in SSD are stored compressed, and the admin API says by how much.
            assert admin(pool.master_url, "/v1/cluster")[1]["tiers"]["ssd"]["compression"] > 1.5
            assert tiers(pool)["ssd"]["compression"] > 1.5
            assert await client.match_prefix(keys, prefetch=True) == 6
            wait_for(lambda: all("host" in tiers_of(pool, k) for k in keys), 10,
                     "the matched blocks to be promoted")
            before = metric(pool, "get_hits_host")
            outs = [np.empty(MiB // 2, np.float16) for _ in keys]
            results = await client.batch_get(keys, outs)
            assert all(r.hit for r in results)
            assert all(np.array_equal(o, smooth(i)) for i, o in enumerate(outs))
            assert metric(pool, "get_hits_host") == before + 6
            assert metric(pool, "get_hits_ssd") == 0
        pool.check()
    finally:
        pool.stop()


def metric(pool: Pool, op: str) -> int:
    import urllib.request

    with urllib.request.urlopen(pool.master_url + "/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(f'kvpool_ops_total{{op="{op}"}}'):
                return int(float(line.split()[-1]))
    return 0
