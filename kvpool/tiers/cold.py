"""What every cold tier shares (the SSD and object tiers build on it): blobs are
``codec.encode_cold`` output, so a store describes itself and the inventory is rebuilt
on open from each blob's header; every read verifies the checksum and drops a block that
fails it; every blocking call (LMDB, files, S3, compression) runs in a bounded executor.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import replace
from typing import Any, Callable, Iterator, Protocol, TypeVar

import zstandard

from kvpool import codec as blockcodec
from kvpool.codec import BlockHeader, Codec, ColdCodec
from kvpool.errors import BadRequest, BlockNotFound, ChecksumMismatch, KVPoolError, TierFull
from kvpool.keys import KEY_BYTES, BlockKey
from kvpool.tiers.base import StoredBlock, TierKind

log = logging.getLogger(__name__)
T = TypeVar("T")
HEAD_BYTES = 1024  # a cold blob's header always fits in its first 1 KiB
MiB = 1 << 20


class BlobStore(Protocol):
    """Where a cold tier keeps its blobs; each call blocks and runs in the executor."""

    scan_threads: int  # how many header reads the open-time scan may run at once

    def put(self, key: BlockKey, blob: bytes) -> None:
        """Store atomically: a crash leaves the old state or the whole blob. TierFull when full."""

    def get(self, key: BlockKey) -> bytes | None: ...

    def get_range(self, key: BlockKey, length: int) -> bytes | None:
        """The first ``length`` bytes (fewer if the blob is shorter); None when absent."""

    def delete(self, key: BlockKey) -> bool: ...

    def list(self) -> Iterator[tuple[BlockKey, int]]:
        """Every stored key with its blob's size in bytes."""

    def close(self) -> None: ...


class ColdTier:
    """A Tier over a BlobStore: compression, checksums, capacity and the inventory."""

    def __init__(self, kind: TierKind, store: BlobStore, capacity: int, codec: ColdCodec = ColdCodec(),
                 executor: ThreadPoolExecutor | None = None) -> None:
        if capacity <= 0:
            raise BadRequest(f"a {kind.value} tier needs a positive capacity, got {capacity}")
        self.kind = kind
        self.capacity = capacity
        self._store = store
        self._codec = codec
        self._blocks: dict[BlockKey, StoredBlock] = {}
        self._used = 0
        self._reserved = 0  # bytes of writes between their capacity check and their commit
        self._inflight: dict[BlockKey, asyncio.Task[StoredBlock]] = {}
        self._closed = False
        self.shared = False  # other nodes write and delete in this store too (object tier)
        self._scan()
        self._own_executor = executor is None
        self._executor: Executor = executor or ThreadPoolExecutor(4, thread_name_prefix=f"kvpool-{kind.value}")

    # -- questions ----------------------------------------------------------------------

    def used(self) -> int:
        return self._used

    def __len__(self) -> int:
        return len(self._blocks)

    def contains(self, key: BlockKey) -> bool:
        return key in self._blocks

    def inventory(self) -> list[StoredBlock]:
        return list(self._blocks.values())

    # -- mutations ----------------------------------------------------------------------

    async def write(self, key: BlockKey, header: BlockHeader, payload: bytes | memoryview,
                    location: int = 0) -> StoredBlock:
        """Verify, encode and persist. A key already present (or being written) is not
        written again. The commit is shielded, so a cancelled caller never leaves a blob
        in the store that the inventory does not list."""
        self._check_open()
        existing = self._blocks.get(key)
        if existing is not None:
            return existing
        task = self._inflight.get(key)
        if task is None:
            view = memoryview(payload).cast("B")
            if view.nbytes != header.payload_size:
                raise BadRequest(f"payload is {view.nbytes} bytes, header says {header.payload_size}")
            task = asyncio.get_running_loop().create_task(self._write(key, header, view))
            task.add_done_callback(_retrieve)
            self._inflight[key] = task
        return await asyncio.shield(task)

    async def read(self, key: BlockKey) -> tuple[BlockHeader, bytes]:
        """Decode and verify; a corrupt block is deleted from store and inventory first."""
        self._check_open()
        block = self._blocks.get(key)
        if block is None and self.shared:  # another node may have written it
            blob = await self._run(self._store.get, key)
            if blob is not None and key not in self._blocks:
                try:
                    header = blockcodec.header_of_cold(blob[:HEAD_BYTES])
                except KVPoolError:
                    header = None
                if header is not None:
                    self._blocks[key] = StoredBlock(key, header, 0, len(blob))
                    self._used += len(blob)
            block = self._blocks.get(key)
        if block is None:
            raise BlockNotFound(f"block {key.hex()} is not in the {self.kind.value} tier")
        blob = await self._run(self._store.get, key)
        if blob is None:  # removed while we read, or behind our back: a miss
            self._forget(block)
            raise BlockNotFound(f"block {key.hex()} is gone from the {self.kind.value} tier")
        try:
            header, payload = await self._run(_decode, blob)
            if header != block.header:
                raise ChecksumMismatch(f"stored header {header} differs from the one written")
        except ChecksumMismatch as exc:
            log.warning("block %s in the %s tier is corrupt, dropping it: %s", key.hex(), self.kind.value, exc)
            if self._forget(block):
                await self._run(self._store.delete, key)
            raise ChecksumMismatch(f"block {key.hex()} in the {self.kind.value} tier failed "
                                   f"verification and was dropped: {exc}") from None
        return header, payload

    async def remove(self, key: BlockKey) -> bool:
        self._check_open()
        block = self._blocks.get(key)
        if block is None and self.shared:  # written by another node: delete it all the same
            return bool(await self._run(self._store.delete, key))
        if block is None or not self._forget(block):
            return False
        try:
            await self._run(self._store.delete, key)
        except BaseException:
            if key not in self._blocks:  # roll back: the blob is still there, so list it
                self._blocks[key] = block
                self._used += block.size
            raise
        return True

    def check(self) -> None:
        assert self._used == sum(b.size for b in self._blocks.values()), "used() != sum of sizes"
        assert self._reserved >= 0, "negative reservation"
        for key, b in self._blocks.items():
            assert b.key == key and len(key) == KEY_BYTES, f"bad key {key!r}"
            assert b.location == 0 and b.size > 0, f"block {key.hex()} has a bad record"
            assert b.header.codec == Codec.RAW, f"block {key.hex()} lists a stored codec"

    async def close(self) -> None:
        """Let in-flight writes commit, then close the store (and our own executor)."""
        if self._closed:
            return
        if self._inflight:
            await asyncio.gather(*self._inflight.values(), return_exceptions=True)
        self._closed = True
        await self._run(self._store.close)
        if self._own_executor:
            self._executor.shutdown(wait=False)

    # -- internals ----------------------------------------------------------------------

    async def _write(self, key: BlockKey, header: BlockHeader, view: memoryview) -> StoredBlock:
        try:
            header = replace(header, codec=Codec.RAW)
            # Room for the most the blob can take (one that compresses too little is stored
            # raw) lets it be encoded and stored in one trip to the I/O threads: on a busy
            # machine each trip costs milliseconds, and demotions wait on them. Near full,
            # the exact size decides, which takes two.
            bound = len(header.encode()) + 8 + view.nbytes
            if self._used + self._reserved + bound <= self.capacity:
                self._reserved += bound
                try:
                    size = await self._run(self._encode_and_put, key, header, view)
                finally:
                    self._reserved -= bound
            else:
                blob = await self._run(_encode, header, view, self._codec)
                size = len(blob)
                if self._used + self._reserved + size > self.capacity:
                    raise TierFull(f"{self.kind.value} tier has "
                                   f"{self.capacity - self._used - self._reserved} free bytes, "
                                   f"block {key.hex()} needs {size}")
                self._reserved += size
                try:
                    await self._run(self._store.put, key, blob)
                finally:
                    self._reserved -= size
            block = StoredBlock(key, header, 0, size)
            self._blocks[key] = block
            self._used += size
            return block
        finally:
            self._inflight.pop(key, None)

    def _encode_and_put(self, key: BlockKey, header: BlockHeader, view: memoryview) -> int:
        blob = _encode(header, view, self._codec)
        self._store.put(key, blob)
        return len(blob)

    def _forget(self, block: StoredBlock) -> bool:
        """Drop ``block`` from the inventory unless another record replaced it meanwhile."""
        if self._blocks.get(block.key) is not block:
            return False
        del self._blocks[block.key]
        self._used -= block.size
        return True

    async def rescan(self) -> None:
        """List the store again: in a shared store, blocks other nodes wrote join the inventory."""
        for block in await self._run(self._listing, set(self._blocks)):
            if block.key not in self._blocks:
                self._blocks[block.key] = block
                self._used += block.size

    def _scan(self) -> None:
        """Rebuild the inventory from the store."""
        for block in self._listing(set()):
            self._blocks[block.key] = block
            self._used += block.size
        log.info("%s tier: %d blocks, %d bytes reloaded", self.kind.value, len(self._blocks), self._used)

    def _listing(self, known: set[BlockKey]) -> list[StoredBlock]:
        """The store's blocks but ``known`` ones, from their headers; a blob whose header
        does not parse is deleted."""
        listed = [(k, size) for k, size in self._store.list() if k not in known]
        keys = [key for key, _ in listed]
        head_of = functools.partial(self._store.get_range, length=HEAD_BYTES)
        if self._store.scan_threads > 1 and len(keys) > 1:
            # A private pool: the caller may itself be running in the tier's executor.
            with ThreadPoolExecutor(self._store.scan_threads) as pool:
                heads = list(pool.map(head_of, keys))
        else:
            heads = [head_of(k) for k in keys]
        out = []
        for (key, size), head in zip(listed, heads):
            if head is None:  # deleted since the listing
                continue
            try:
                header = blockcodec.header_of_cold(head)
            except KVPoolError as exc:
                log.warning("deleting unreadable blob %s from the %s tier: %s", key.hex(), self.kind.value, exc)
                self._store.delete(key)
                continue
            out.append(StoredBlock(key, header, 0, size))
        return out

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(fn, *args))

    def _check_open(self) -> None:
        if self._closed:
            raise BadRequest(f"the {self.kind.value} tier is closed")


def _encode(header: BlockHeader, view: memoryview, codec: ColdCodec) -> bytes:
    """A cold tier never stores a payload that does not match its header."""
    blockcodec.verify(header, view)
    return blockcodec.encode_cold(header, view, codec)


def _decode(blob: bytes) -> tuple[BlockHeader, bytes]:
    """decode_cold, with every way a damaged blob can fail reported as ChecksumMismatch."""
    try:
        return blockcodec.decode_cold(blob)
    except (BadRequest, ValueError, zstandard.ZstdError) as exc:
        raise ChecksumMismatch(f"blob does not decode: {exc}") from None


def _retrieve(task: asyncio.Task[Any]) -> None:
    """Mark a write's exception as seen: its callers got it, or went away."""
    if not task.cancelled():
        task.exception()
