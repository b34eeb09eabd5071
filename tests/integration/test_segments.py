"""Scatter/gather blocks: a block given as a list of memory segments (as a paged cache
holds it, one piece per layer) is put and got in one call, lands segment by segment, and
is the same block as its contiguous bytes: same checksum, readable either way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clients.client import AsyncPoolClient
from clients.segments import Segments
from kvpool.errors import BadRequest
from kvpool.keys import Namespace, block_keys
from tests.integration.conftest import Pool

KiB = 1 << 10


def keys_for(tag: str, n: int) -> list[bytes]:
    return block_keys(Namespace("segments", "uint8", "raw", block_tokens=1, salt=tag), np.arange(n))


def paged_cache(layers: int, blocks: int, seg_bytes: int, seed: int) -> list[torch.Tensor]:
    """One tensor per layer, [blocks, bytes]: a block is one row of every layer."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (blocks, seg_bytes), dtype=torch.uint8, generator=g)
            for _ in range(layers)]


def block(cache: list[torch.Tensor], b: int) -> Segments:
    return Segments([layer[b] for layer in cache])


async def test_segmented_put_reads_back_contiguous_and_segmented(pool: Pool) -> None:
    src = paged_cache(layers=4, blocks=8, seg_bytes=16 * KiB, seed=1)
    keys = keys_for("roundtrip", 5)
    async with AsyncPoolClient(pool.client_config()) as client:
        for layer in src:
            client.register(layer)
        put = await client.batch_put(keys, [block(src, b) for b in (3, 0, 7, 1, 5)], chained=True)
        assert all(r.stored for r in put)
        # contiguous readers see the layers' rows back to back
        flat = np.empty(4 * 16 * KiB, dtype=np.uint8)
        assert await client.get(keys[2], flat) is not None
        assert np.array_equal(flat, torch.cat([layer[7] for layer in src]).numpy())
        # a second paged cache gets them segment by segment, in one batched call
        dst = [torch.zeros_like(layer) for layer in src]
        res = await client.batch_get(keys, [block(dst, b) for b in range(5)])
        assert all(r.hit for r in res)
        for i, b in enumerate((3, 0, 7, 1, 5)):
            for layer_src, layer_dst in zip(src, dst):
                assert torch.equal(layer_dst[i], layer_src[b])
        assert all(torch.count_nonzero(layer[5:]) == 0 for layer in dst)  # nothing else touched


async def test_contiguous_put_lands_in_segments_unregistered_too(pool: Pool) -> None:
    key = keys_for("contig", 1)[0]
    value = np.random.default_rng(2).integers(0, 256, 3 * 8 * KiB, dtype=np.uint8)
    async with AsyncPoolClient(pool.client_config()) as client:
        assert (await client.put(key, value)).stored
        parts = [np.zeros(8 * KiB, dtype=np.uint8) for _ in range(3)]  # not registered
        header = await client.get(key, Segments(parts))
        assert header is not None and header.payload_size == value.nbytes
        assert np.array_equal(np.concatenate(parts), value)


async def test_segments_of_uneven_sizes_and_a_miss(pool: Pool) -> None:
    k_hit, k_miss = keys_for("uneven", 2)
    parts = [np.arange(n, dtype=np.uint8) for n in (100, 4096, 7, 1000)]
    async with AsyncPoolClient(pool.client_config()) as client:
        await client.put(k_hit, Segments(parts))
        out = [np.zeros_like(p) for p in parts]
        res = await client.batch_get([k_hit, k_miss], [Segments(out), Segments([np.zeros(8, np.uint8)])])
        assert res[0].hit and not res[1].hit and res[1].error is None
        assert all(np.array_equal(a, b) for a, b in zip(out, parts))


async def test_segments_must_share_a_memory_type_and_exist(pool: Pool) -> None:
    with pytest.raises(BadRequest):
        Segments([])
    async with AsyncPoolClient(pool.client_config()) as client:
        with pytest.raises(BadRequest):
            await client.put(keys_for("bad", 1)[0], Segments([np.zeros(4, np.uint8)[::2]]))


async def test_raw_host_rows_are_the_same_block(pool: Pool) -> None:
    """(address, length) rows of registered host memory move like buffers do."""
    src = paged_cache(layers=3, blocks=4, seg_bytes=4 * KiB, seed=5)
    dst = [torch.zeros_like(layer) for layer in src]
    key = keys_for("rows", 1)[0]
    seg = 4 * KiB

    def rows_of(cache: list[torch.Tensor], b: int) -> Segments:
        return Segments([(layer.data_ptr() + b * seg, seg) for layer in cache], owner=cache)

    async with AsyncPoolClient(pool.client_config()) as client:
        for layer in src + dst:
            client.register(layer)
        await client.put(key, rows_of(src, 2))
        assert await client.get(key, rows_of(dst, 1)) is not None
        assert all(torch.equal(d[1], s[2]) for s, d in zip(src, dst))
        flat = np.empty(3 * seg, dtype=np.uint8)  # and as one contiguous buffer: same checksum
        assert await client.get(key, flat) is not None
        assert np.array_equal(flat, torch.cat([s[2] for s in src]).numpy())


async def test_a_segment_table_is_the_same_block(pool: Pool) -> None:
    """A block as a numpy table of (address, length) rows of registered memory (how the
    vLLM connector hands over its blocks): same bytes, same checksum as the other forms."""
    src = paged_cache(layers=3, blocks=4, seg_bytes=6 * KiB, seed=7)
    dst = [torch.zeros_like(layer) for layer in src]
    k_table, k_flat = keys_for("table", 2)
    seg = 6 * KiB

    def table_of(cache: list[torch.Tensor], b: int) -> Segments:
        return Segments(np.array([[layer.data_ptr() + b * seg, seg] for layer in cache], np.int64),
                        owner=cache)

    async with AsyncPoolClient(pool.client_config()) as client:
        for layer in src + dst:
            client.register(layer)
        assert (await client.put(k_table, table_of(src, 3))).stored
        header = await client.get(k_table, table_of(dst, 0))
        assert header is not None and header.payload_size == 3 * seg
        assert all(torch.equal(d[0], s[3]) for s, d in zip(src, dst))
        flat = np.empty(3 * seg, dtype=np.uint8)
        assert await client.get(k_table, flat) is not None
        assert np.array_equal(flat, torch.cat([s[3] for s in src]).numpy())
        # a contiguous block read into a table that is bigger than it: only its bytes land
        assert (await client.put(k_flat, flat[: 2 * seg + 100])).stored
        res = await client.batch_get([k_flat], [table_of(dst, 2)])
        assert res[0].hit and res[0].tier == "host"
        got = torch.cat([d[2] for d in dst]).numpy()
        assert np.array_equal(got[: 2 * seg + 100], flat[: 2 * seg + 100])
        assert not got[2 * seg + 100:].any()
    with pytest.raises(BadRequest):
        Segments(np.zeros((0, 2), np.int64))
    with pytest.raises(BadRequest):
        Segments(np.zeros((3,), np.int64))


async def test_a_block_written_layer_by_layer_is_the_same_block(pool: Pool) -> None:
    """A staged put: reserved first, each layer's share of every block written as it is
    ready, committed at the end; readers see the same bytes and checksum as a one-shot put,
    and nothing before the commit."""
    src = paged_cache(layers=4, blocks=6, seg_bytes=8 * KiB, seed=3)
    keys = keys_for("layered", 3)
    once = keys_for("layered-once", 3)
    async with AsyncPoolClient(pool.client_config()) as client:
        for layer in src:
            client.register(layer)
        put = await client.begin_put(keys, [4 * 8 * KiB] * 3, chained=True)
        assert put.new == [0, 1, 2]
        for i, layer in enumerate(src):
            assert await client.batch_exists(keys) == [False] * 3  # pending until the commit
            await put.write([layer[b] for b in (4, 1, 2)], i * 8 * KiB)
        assert all(r.stored for r in await put.commit())
        ref = await client.batch_put(once, [block(src, b) for b in (4, 1, 2)], chained=True)
        assert all(r.stored for r in ref)
        dst = [torch.zeros_like(layer) for layer in src]
        res = await client.batch_get(keys + once, [block(dst, b) for b in range(6)])
        assert all(r.hit for r in res)
        assert [r.header.checksum for r in res[:3]] == [r.header.checksum for r in res[3:]]  # type: ignore[union-attr]
        for layer_src, layer_dst in zip(src, dst):
            assert torch.equal(layer_dst[:3], layer_src[[4, 1, 2]])
        # a second writer of the same keys has nothing to write
        again = await client.begin_put(keys, [4 * 8 * KiB] * 3)
        assert again.new == [] and not any(r.stored for r in await again.commit())


async def test_a_staged_put_refuses_parts_out_of_order_and_an_early_commit(pool: Pool) -> None:
    src = paged_cache(layers=2, blocks=2, seg_bytes=4 * KiB, seed=4)
    keys = keys_for("layered-bad", 2)
    async with AsyncPoolClient(pool.client_config()) as client:
        put = await client.begin_put(keys, [8 * KiB] * 2)
        with pytest.raises(BadRequest, match="bytes written"):
            await put.write([src[1][0], src[1][1]], 4 * KiB)  # layer 1 before layer 0
        await put.write([src[0][0], src[0][1]], 0)
        with pytest.raises(BadRequest, match="not fully written"):
            await put.commit()
        assert await client.batch_exists(keys) == [False, False]  # aborted: nothing visible
        with pytest.raises(BadRequest, match="aborted"):
            await put.write([src[1][0], src[1][1]], 4 * KiB)
        with pytest.raises(BadRequest, match="overrun"):
            bad = await client.begin_put(keys, [8 * KiB] * 2)
            await bad.write([torch.cat([src[0][b], src[1][b], src[0][b]]) for b in range(2)], 0)
        # the keys are free again once the aborted reservations are handed back
        redo = await client.begin_put(keys, [8 * KiB] * 2)
        assert redo.new == [0, 1]
        await redo.write([torch.cat([src[0][b], src[1][b]]) for b in range(2)], 0)
        assert all(r.stored for r in await redo.commit())
