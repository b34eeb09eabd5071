"""Pressure moves blocks down the tiers; cold blocks read back bit-exact, survive a daemon
restart, and a block damaged on disk is dropped, never served."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Iterator

import lmdb
import numpy as np
import pytest

from clients.client import AsyncPoolClient
from kvpool.errors import ChecksumMismatch
from kvpool.keys import Namespace, block_keys
from tests.integration.conftest import Pool, admin, make_pool, wait_for

MiB = 1 << 20
N = 150


@pytest.fixture(scope="module")
def small_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    p = make_pool(tmp_path_factory.mktemp("tiers"),
                  daemon_env={"KVPOOL_DAEMON_HOST_BYTES": "32MiB", "KVPOOL_DAEMON_SSD_BYTES": "48MiB"})
    try:
        yield p
        p.check()
    finally:
        p.stop()


KEYS = block_keys(Namespace("itest-tiers", "float16", "raw", block_tokens=1), np.arange(N))


def value(i: int) -> np.ndarray:
    """Half smooth KV-like float16 blocks (they compress), half random bytes (they do not)."""
    rng = np.random.default_rng(i)
    if i % 2:
        return rng.integers(0, 256, MiB, dtype=np.uint8).view(np.float16)
    ramp = np.linspace(0, 1, MiB // 2, dtype=np.float32)
    return (ramp * rng.standard_normal() + 0.01 * rng.standard_normal(MiB // 2)).astype(np.float16)


def tiers_of(pool: Pool, key: bytes) -> set[str]:
    status, body = admin(pool.master_url, f"/v1/blocks/{key.hex()}")
    return {r["tier"] for r in body["replicas"]} if status == 200 else set()


async def test_pressure_demotes_to_ssd_then_object_and_everything_reads_back(small_pool: Pool) -> None:
    async with AsyncPoolClient(small_pool.client_config()) as client:
        for start in range(0, N, 10):
            await client.batch_put(KEYS[start:start + 10], [value(i) for i in range(start, start + 10)])
        wait_for(lambda: any(tiers_of(small_pool, k) == {"object"} for k in KEYS), 20,
                 "blocks to reach the object tier")
        placed = [tiers_of(small_pool, k) for k in KEYS]
        assert any(t == {"ssd"} for t in placed), placed
        assert any("host" in t for t in placed), placed
        out = np.empty(MiB // 2, np.float16)
        for i, key in enumerate(KEYS):  # cold ones are promoted into the host arena first
            assert await client.get(key, out) is not None, f"block {i} missing"
            assert out.tobytes() == value(i).tobytes(), f"block {i} came back different"
    small_pool.check()


async def test_restart_keeps_cold_blocks_and_drops_damaged_ones(small_pool: Pool) -> None:
    fresh = block_keys(Namespace("itest-tiers", "float16", "raw", block_tokens=1, salt="fresh"),
                       np.arange(3))
    async with AsyncPoolClient(small_pool.client_config()) as client:  # new blocks land in host
        await client.batch_put(fresh, [np.full(64 << 10, i, np.uint8) for i in range(3)])
    assert [tiers_of(small_pool, k) for k in fresh] == [{"host"}] * 3
    cold = {k: tiers_of(small_pool, k) for k in KEYS}
    ssd_keys = [k for k, t in cold.items() if t == {"ssd"}]
    object_keys = [k for k, t in cold.items() if t == {"object"}]
    promoted = [k for k, t in cold.items() if "host" in t and len(t) > 1]  # read back earlier
    # one damaged and at least one survivor in each cold tier, and hot copies that must go
    assert len(ssd_keys) >= 2 and len(object_keys) >= 2 and promoted, cold
    small_pool.kill_daemon(signal.SIGKILL)
    data = Path(small_pool.tmp) / "node0"
    damaged_ssd, damaged_object = ssd_keys[0], object_keys[0]
    env = lmdb.open(str(data / "ssd"), subdir=True, lock=True)
    with env.begin(write=True) as txn:
        blob = bytearray(txn.get(damaged_ssd))
        blob[-100] ^= 0xFF  # the payload, well past the header
        txn.put(damaged_ssd, bytes(blob))
    env.close()
    obj = next((data / "objects").rglob(damaged_object.hex()))
    blob = bytearray(obj.read_bytes())
    blob[-100] ^= 0xFF
    obj.write_bytes(bytes(blob))

    small_pool.start_daemon()
    survivors = ssd_keys[1:] + object_keys[1:]
    wait_for(lambda: all(tiers_of(small_pool, k) for k in survivors[:5]), 15,
             "the restarted daemon's cold blocks to be listed again")
    index = {k: i for i, k in enumerate(KEYS)}
    async with AsyncPoolClient(small_pool.client_config()) as client:
        out = np.empty(MiB // 2, np.float16)
        for key in survivors:
            assert await client.get(key, out) is not None, "a cold block did not survive the restart"
            assert out.tobytes() == value(index[key]).tobytes()
        for key in (damaged_ssd, damaged_object):
            out[:] = 0
            try:
                header = await client.get(key, out)
            except ChecksumMismatch:
                header = None
            assert header is None, "a damaged block was served"
            assert not await client.exists(key)
            assert admin(small_pool.master_url, f"/v1/blocks/{key.hex()}")[0] == 404
        for key in promoted:  # the host copy went with the arena; the cold copy serves
            assert tiers_of(small_pool, key) == cold[key] - {"host"}
            assert await client.get(key, out) is not None
            assert out.tobytes() == value(index[key]).tobytes()
        for key in fresh:  # the host arena does not survive a restart: a miss, not bytes
            assert await client.get(key, np.zeros(64 << 10, np.uint8)) is None
            assert not await client.exists(key)
