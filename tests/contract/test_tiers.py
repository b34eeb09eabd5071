"""The Tier contract: every tier (gpu and host arenas, ssd, object over a folder and over
S3) passes the same suite, with ``check()`` after every mutation."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
import torch

from kvpool.codec import BlockHeader, make_header
from kvpool.config import DaemonConfig
from kvpool.errors import BadRequest, BlockNotFound, ChecksumMismatch, TierFull
from kvpool.keys import BlockKey
from kvpool.tiers.base import StoredBlock, Tier, TierKind
from kvpool.tiers.factory import open_tiers

from .conftest import Harness, MiB

KiB = 1 << 10


def key(i: int) -> BlockKey:
    return i.to_bytes(4, "little") * 4


def kv(nbytes: int, seed: int) -> np.ndarray:
    """float16 like a KV cache: normally distributed activations."""
    return np.random.default_rng(seed).standard_normal(nbytes // 2).astype(np.float16)


def smooth(nbytes: int, seed: int) -> np.ndarray:
    """float16 whose neighbours are close: what byte planes + zstd are for."""
    steps = np.random.default_rng(seed).normal(0, 1e-3, nbytes // 2)
    return np.cumsum(steps).astype(np.float16)


def noise(nbytes: int, seed: int) -> np.ndarray:
    """Incompressible bytes, so a cold tier stores about as much as it is given."""
    return np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8)


def header_of(arr: np.ndarray) -> BlockHeader:
    return make_header(arr, str(arr.dtype), arr.shape, layout="contract")


async def put(h: Harness, tier: Tier, k: BlockKey, arr: np.ndarray, location: int | None = None) -> StoredBlock:
    if location is None:
        location = h.place(arr.nbytes)
    block = await tier.write(k, header_of(arr), memoryview(arr), location)
    tier.check()
    return block


async def assert_holds(tier: Tier, expected: dict[BlockKey, np.ndarray]) -> None:
    """The tier lists exactly ``expected`` and every block reads back bit-exact."""
    tier.check()
    inventory = tier.inventory()
    assert len(tier) == len(expected) == len(inventory)
    assert {b.key for b in inventory} == set(expected)
    assert tier.used() == sum(b.size for b in inventory)
    for k, arr in expected.items():
        assert tier.contains(k)
        header, payload = await tier.read(k)
        assert header == header_of(arr)
        assert bytes(payload) == arr.tobytes()


async def test_implements_the_protocol(harness: Harness, tier: Tier) -> None:
    assert isinstance(tier, Tier)
    assert tier.kind == harness.kind and tier.capacity == harness.capacity
    assert len(tier) == 0 and tier.used() == 0 and tier.inventory() == []


async def test_round_trip_is_bit_exact(harness: Harness, tier: Tier) -> None:
    sizes = [4 * KiB, 12 * KiB + 2, 64 * KiB, 1 * MiB, 8 * MiB]
    expected = {key(i): kv(n, i) for i, n in enumerate(sizes)}
    for k, arr in expected.items():
        block = await put(harness, tier, k, arr)
        assert block.key == k and block.header == header_of(arr)
    await assert_holds(tier, expected)


async def test_remove_forgets_exactly_one_block(harness: Harness, tier: Tier) -> None:
    expected = {key(i): kv(64 * KiB, i) for i in range(3)}
    for k, arr in expected.items():
        await put(harness, tier, k, arr)
    used = tier.used()
    size = next(b.size for b in tier.inventory() if b.key == key(1))
    assert await tier.remove(key(1)) is True
    tier.check()
    del expected[key(1)]
    assert tier.used() == used - size
    assert not tier.contains(key(1))
    with pytest.raises(BlockNotFound):
        await tier.read(key(1))
    assert await tier.remove(key(1)) is False
    tier.check()
    await assert_holds(tier, expected)


async def test_missing_key_is_not_found(tier: Tier) -> None:
    assert not tier.contains(key(99))
    with pytest.raises(BlockNotFound):
        await tier.read(key(99))
    assert await tier.remove(key(99)) is False
    tier.check()


async def test_duplicate_write_keeps_the_original(harness: Harness, tier: Tier) -> None:
    first, second = kv(64 * KiB, 1), kv(64 * KiB, 2)
    block = await put(harness, tier, key(1), first)
    used = tier.used()
    again = await put(harness, tier, key(1), second)
    assert again == block
    assert tier.used() == used
    await assert_holds(tier, {key(1): first})


async def test_concurrent_writes_of_one_key_store_it_once(harness: Harness, tier: Tier) -> None:
    arrs = {i: kv(256 * KiB, i) for i in range(4)}
    blocks = await asyncio.gather(*(put(harness, tier, key(1 if i < 3 else 2), a) for i, a in arrs.items()))
    assert blocks[0] == blocks[1] == blocks[2]
    winner = next(a for i, a in arrs.items() if i < 3 and header_of(a) == blocks[0].header)
    await assert_holds(tier, {key(1): winner, key(2): arrs[3]})


async def test_wrong_payload_size_is_a_bad_request(harness: Harness, tier: Tier) -> None:
    arr = kv(64 * KiB, 1)
    with pytest.raises(BadRequest):
        await tier.write(key(1), header_of(arr), memoryview(arr)[:-1], harness.place(arr.nbytes))
    tier.check()
    assert not tier.contains(key(1)) and tier.used() == 0


async def test_full_tier_refuses_and_loses_nothing(harness: Harness, tier: Tier) -> None:
    expected = {key(1): noise(8 * MiB, 1), key(2): noise(8 * MiB, 2)}
    for k, arr in expected.items():
        await put(harness, tier, k, arr)
    used = tier.used()
    too_big = noise(9 * MiB, 3)  # 16 + 9 MiB > 24 MiB
    free_at = harness.place(too_big.nbytes)
    with pytest.raises(TierFull):
        await put(harness, tier, key(3), too_big, free_at)
    tier.check()
    assert tier.used() == used and not tier.contains(key(3))
    await assert_holds(tier, expected)
    expected[key(4)] = noise(4 * MiB, 4)  # what still fits is still stored
    await put(harness, tier, key(4), expected[key(4)], free_at)
    await assert_holds(tier, expected)
    if harness.cold:  # nothing half-written survives a restart either
        await tier.close()
        await assert_holds(harness.open(), expected)


async def test_stored_size(harness: Harness, tier: Tier) -> None:
    """Hot tiers hold the raw payload; cold tiers compress smooth float16."""
    arr = smooth(1 * MiB, 1)
    block = await put(harness, tier, key(1), arr)
    assert tier.used() == block.size
    await assert_holds(tier, {key(1): arr})
    if harness.cold:
        assert block.size < arr.nbytes * 0.8, f"stored {block.size} of {arr.nbytes} bytes"
        await tier.close()  # the store's own bytes, not just what the tier reports
        assert len(harness.raw_get(key(1)) or b"") == block.size  # type: ignore[misc]
    else:
        assert block.size == arr.nbytes


async def test_restart_reloads_every_block(harness: Harness, tier: Tier) -> None:
    if not harness.cold:
        pytest.skip("arena memory does not outlive its process")
    expected = {key(i): (smooth if i % 2 else kv)(n, i)
                for i, n in enumerate([4 * KiB, 64 * KiB, 1 * MiB, 8 * MiB])}
    for k, arr in expected.items():
        await put(harness, tier, k, arr)
    before = sorted(tier.inventory(), key=lambda b: b.key)
    await tier.close()
    reopened = harness.open()
    assert sorted(reopened.inventory(), key=lambda b: b.key) == before
    await assert_holds(reopened, expected)


async def test_corrupt_block_is_dropped_never_served(harness: Harness, tier: Tier) -> None:
    if not harness.cold:
        pytest.skip("hot tiers are trusted; clients verify what they read")
    assert harness.raw_get is not None and harness.raw_put is not None
    good, bad = kv(256 * KiB, 1), kv(256 * KiB, 2)
    await put(harness, tier, key(1), good)
    await put(harness, tier, key(2), bad)
    await tier.close()
    blob = bytearray(harness.raw_get(key(2)) or b"")
    for pos in (len(blob) // 2, len(blob) - 1):  # inside the payload, well past the header
        blob[pos] ^= 0xFF
    harness.raw_put(key(2), bytes(blob))
    tier = harness.open()
    assert tier.contains(key(2))  # its header is intact, so it is listed until read
    with pytest.raises(ChecksumMismatch):
        await tier.read(key(2))
    tier.check()
    assert not tier.contains(key(2))
    assert key(2) not in {b.key for b in tier.inventory()}
    with pytest.raises(BlockNotFound):
        await tier.read(key(2))
    await assert_holds(tier, {key(1): good})
    await tier.close()
    assert harness.raw_get(key(2)) is None  # deleted from storage, not just hidden
    await assert_holds(harness.open(), {key(1): good})


async def test_unreadable_blob_is_deleted_on_open(harness: Harness, tier: Tier) -> None:
    if not harness.cold:
        pytest.skip("only cold tiers reload an inventory")
    assert harness.raw_put is not None
    arr = kv(64 * KiB, 1)
    await put(harness, tier, key(1), arr)
    await tier.close()
    harness.raw_put(key(2), b"this is not a kvpool block" * 10)
    reopened = harness.open()
    await assert_holds(reopened, {key(1): arr})
    await reopened.close()
    assert harness.raw_get(key(2)) is None  # deleted, not just skipped


async def test_cold_tier_refuses_a_payload_that_fails_its_checksum(harness: Harness, tier: Tier) -> None:
    if not harness.cold:
        pytest.skip("hot tiers do not verify")
    arr = kv(64 * KiB, 1)
    wrong = kv(64 * KiB, 2)
    with pytest.raises(ChecksumMismatch):
        await tier.write(key(1), header_of(arr), memoryview(wrong))
    tier.check()
    assert not tier.contains(key(1)) and tier.used() == 0


# -- arenas: what the master and NIXL rely on ---------------------------------------------


async def test_arena_adopts_bytes_written_in_place() -> None:
    from kvpool.tiers.arena import ArenaTier

    arena = ArenaTier.host(4 * MiB)
    try:
        assert arena.mem_type == "DRAM" and arena.address % 4096 == 0
        arr = kv(64 * KiB, 1)
        arena.view(8192, arr.nbytes)[:] = arr.tobytes()  # what a client's NIXL WRITE does
        block = arena.adopt(key(1), header_of(arr), 8192)
        arena.check()
        assert block.location == 8192 and arena.used() == arr.nbytes
        header, payload = await arena.read(key(1))
        assert header == header_of(arr) and bytes(payload) == arr.tobytes()
        arena.view(8192, 2)[:] = b"\0\0"
        assert bytes(payload[:2]) == b"\0\0"  # reads are views of the arena, not copies
    finally:
        await arena.close()


async def test_arena_refuses_overlap_and_out_of_bounds(arena_harness: Harness) -> None:
    arena = arena_harness.open()
    arr = kv(64 * KiB, 1)
    await arena.write(key(1), header_of(arr), memoryview(arr), 64 * KiB)
    for location in (64 * KiB + 4096, 4096):  # overlaps the end, then the start
        with pytest.raises(BadRequest):
            await arena.write(key(2), header_of(arr), memoryview(kv(64 * KiB, 2)), location)
        with pytest.raises(BadRequest):
            arena.adopt(key(2), header_of(arr), location)  # type: ignore[attr-defined]
    with pytest.raises(BadRequest):
        arena.adopt(key(2), header_of(arr), arena.capacity - 4096)  # type: ignore[attr-defined]
    with pytest.raises(BadRequest):
        arena.adopt(key(2), header_of(arr), -4096)  # type: ignore[attr-defined]
    arena.check()
    await assert_holds(arena, {key(1): arr})  # the refused writes touched none of its bytes
    await arena.write(key(2), header_of(arr), memoryview(arr), 0)  # adjacent spans are fine
    arena.check()
    assert len(arena) == 2


async def test_open_tiers_builds_the_configured_tiers(tmp_path: Path) -> None:
    cfg = DaemonConfig(data_dir=str(tmp_path), host_bytes=4 * MiB, gpu_bytes=4 * MiB,
                       ssd_bytes=16 * MiB, object_bytes=16 * MiB, cold_codec="raw")
    tiers = open_tiers(cfg, None)
    try:
        gpu = [TierKind.GPU] if torch.cuda.is_available() else []  # skipped, not an error, without CUDA
        assert list(tiers) == gpu + [TierKind.HOST, TierKind.SSD, TierKind.OBJECT]
        assert (tmp_path / "ssd").is_dir() and (tmp_path / "objects" / "blocks").is_dir()
        arr = smooth(64 * KiB, 1)
        block = await tiers[TierKind.SSD].write(key(1), header_of(arr), memoryview(arr))
        assert block.size > arr.nbytes  # raw codec: header plus the bytes as they are
    finally:
        for t in tiers.values():
            await t.close()
    with pytest.raises(BadRequest):
        open_tiers(DaemonConfig(data_dir=str(tmp_path), cold_codec="lz4"), None)
