"""The SSD tier: cold blobs as values of one LMDB environment."""

from __future__ import annotations

import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import lmdb

from kvpool.codec import ColdCodec
from kvpool.errors import BadRequest, KVPoolError, TierFull
from kvpool.keys import KEY_BYTES, BlockKey
from kvpool.tiers.base import TierKind
from kvpool.tiers.cold import MiB, ColdTier

log = logging.getLogger(__name__)
DISK_SLACK = 1 << 20  # LMDB writes pages beyond the value itself


class _LmdbStore:
    """Blobs as values of one LMDB database, keyed by the 16 raw key bytes."""

    scan_threads = 1  # reads are memory-mapped: a sequential scan is fastest

    def __init__(self, path: Path, map_size: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        # No fsync per write (sync=False): a cache's block need not outlive a crash of the
        # machine, and a flush per block made every demotion wait on the disk (a batch of
        # 64 took seconds on a busy disk, and puts waiting for room with it). LMDB keeps
        # the file consistent without it; a machine crash can only lose the last writes,
        # which a restarted daemon's inventory then does not list. A process crash loses
        # nothing (the kernel has the pages); close() flushes.
        self._env = lmdb.open(str(path), map_size=map_size, subdir=True, readahead=False,
                              meminit=False, max_readers=256, sync=False)

    def put(self, key: BlockKey, blob: bytes) -> None:
        try:
            with self._env.begin(write=True) as txn:  # aborts on any exception
                txn.put(key, blob)
        except lmdb.MapFullError:
            raise TierFull(f"the LMDB map at {self._env.path()} is full") from None
        except lmdb.Error as exc:
            # A full file system surfaces from LMDB's commit as a bare I/O error.
            if shutil.disk_usage(self._env.path()).free < len(blob) + DISK_SLACK:
                raise TierFull(f"the disk holding {self._env.path()} is full ({exc})") from None
            raise KVPoolError(f"LMDB write to {self._env.path()} failed: {exc}") from None

    def get(self, key: BlockKey) -> bytes | None:
        with self._env.begin() as txn:
            return txn.get(key)

    def get_range(self, key: BlockKey, length: int) -> bytes | None:
        with self._env.begin(buffers=True) as txn:
            value = txn.get(key)
            return None if value is None else bytes(value[:length])

    def delete(self, key: BlockKey) -> bool:
        with self._env.begin(write=True) as txn:
            return txn.delete(key)

    def list(self) -> Iterator[tuple[BlockKey, int]]:
        with self._env.begin(buffers=True) as txn:
            items = [(bytes(k), len(v)) for k, v in txn.cursor()]
        for key, size in items:
            if len(key) == KEY_BYTES:
                yield key, size
            else:
                log.warning("ignoring LMDB key %r in %s: not a block key", key[:40], self._env.path())

    def close(self) -> None:
        self._env.sync(True)
        self._env.close()


class SsdTier(ColdTier):
    """The SSD tier: one LMDB environment in a folder; blocks survive a restart."""

    def __init__(self, path: str | Path, capacity: int, codec: ColdCodec = ColdCodec(),
                 executor: ThreadPoolExecutor | None = None) -> None:
        if capacity <= 0:
            raise BadRequest(f"the ssd tier needs a positive capacity, got {capacity}")
        self.path = Path(path)
        # LMDB needs room beyond the payload for its pages, and freed pages linger a while.
        store = _LmdbStore(self.path, int(capacity * 1.25) + 64 * MiB)
        try:
            super().__init__(TierKind.SSD, store, capacity, codec, executor)
        except BaseException:
            store.close()
            raise
