"""Between the engine's paged cache and the pool: one page is one block.

The whole cache tensor is registered with NIXL once, so puts read and gets land straight
in a page, with no staging copy. The namespace carries the model id, dtype and the cache
layout, so engines that differ in any of them never share a key. Pool failures here are
misses: the engine recomputes what it could not fetch, and a block it could not store
is simply not cached; the engine's answer must not depend on the pool's health.
"""

from __future__ import annotations

import logging
from typing import Sequence

from clients.client import AsyncPoolClient
from engine.cache import PagedKVCache
from kvpool.errors import KVPoolError
from kvpool.keys import BlockKey, Namespace

log = logging.getLogger(__name__)


def namespace(model_id: str, dtype: str, cache: PagedKVCache, salt: str = "",
              secret: str = "") -> Namespace:
    """``secret``: the pool client's key secret (its tenant's), keying the root."""
    return Namespace(model_id=model_id, dtype=dtype, kv_layout=cache.layout_tag(),
                     block_tokens=cache.block_tokens, salt=salt, secret=secret)


class KVAdapter:
    def __init__(self, pool: AsyncPoolClient, cache: PagedKVCache, ns: Namespace) -> None:
        self.pool, self.cache, self.ns = pool, cache, ns
        pool.register(cache.kv)  # once, for the cache's lifetime

    async def match(self, keys: Sequence[BlockKey]) -> int:
        """Leading keys the pool holds; 0 when the pool cannot answer."""
        try:
            return await self.pool.match_prefix(keys)
        except KVPoolError as exc:
            log.warning("prefix match failed, computing from scratch: %s", exc)
            return 0

    async def fetch(self, keys: Sequence[BlockKey], pages: Sequence[int]) -> int:
        """Read blocks into pages; returns how many leading ones arrived intact."""
        if not keys:
            return 0
        try:
            results = await self.pool.batch_get(keys, [self.cache.page(p) for p in pages])
        except KVPoolError as exc:
            log.warning("fetching %d blocks failed, recomputing them: %s: %s", len(keys),
                        type(exc).__name__, exc)
            return 0
        got = 0
        for res in results:
            if not res.hit:
                if res.error is not None:
                    log.warning("block %s unusable, recomputing from it: %s", res.key.hex(), res.error)
                break
            got += 1
        return got

    async def store(self, keys: Sequence[BlockKey], pages: Sequence[int],
                    parent: BlockKey | None = None) -> int:
        """Write full pages as blocks (a prefix chain under ``parent``, the block keys[0]
        chains from); returns how many were new."""
        if not keys:
            return 0
        try:
            results = await self.pool.batch_put(keys, [self.cache.page(p) for p in pages],
                                                chained=True, parent=parent,
                                                layout=self.cache.layout_tag(), namespace=self.ns)
        except KVPoolError as exc:
            log.warning("storing %d blocks failed; they stay uncached: %s: %s", len(keys),
                        type(exc).__name__, exc)
            return 0
        return sum(r.stored for r in results)
