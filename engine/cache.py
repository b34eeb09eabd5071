"""The paged KV cache: one tensor whose page IS one pool block, and the pages' bookkeeping.

Layout ``[pages, layers, 2 (K, V), kv_heads, block_tokens, head_dim]``: page-major, so a
page is one contiguous run of bytes that NIXL moves straight to or from the pool. Full
pages of a prompt keep their block key after their request ends and stay reusable
(least recently used first out) until their memory is needed. Every page that becomes
reusable and every reusable page taken for other work is a KV event (kvpool.kv_events),
so a router knows what this engine holds from the engine itself.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch

from engine.config import ModelConfig
from kvpool.errors import CacheFull, KVPoolError
from kvpool.keys import BlockKey
from kvpool.kv_events import EventHub, Reason
from kvpool.tiers.base import TierKind

LAYOUT = "PLCHTD"  # pages, layers, K/V, kv heads, tokens, head dim


class PagedKVCache:
    def __init__(self, model: ModelConfig, num_pages: int, block_tokens: int,
                 node: str = "engine") -> None:
        self.block_tokens = block_tokens
        self.node = node  # names this engine in its events
        self.events = EventHub()
        self.num_pages = num_pages
        self.kv = torch.zeros(num_pages, model.layers, 2, model.kv_heads, block_tokens,
                              model.head_dim, dtype=getattr(torch, model.dtype))
        self.medium = TierKind.GPU if self.kv.is_cuda else TierKind.HOST
        self._free: list[int] = list(range(num_pages - 1, -1, -1))
        self._refs = [0] * num_pages
        self._key_of: dict[int, BlockKey] = {}
        self._by_key: dict[BlockKey, int] = {}
        self._idle: OrderedDict[int, None] = OrderedDict()  # keyed pages nobody uses, LRU first

    def layout_tag(self) -> str:
        _, layers, two, heads, tokens, dim = self.kv.shape
        return f"{LAYOUT}:L{layers}x{two}xH{heads}xT{tokens}xD{dim}"

    @property
    def page_bytes(self) -> int:
        return self.kv[0].numel() * self.kv.element_size()

    def page(self, index: int) -> torch.Tensor:
        return self.kv[index]

    @property
    def available(self) -> int:
        return len(self._free) + len(self._idle)

    @property
    def cached_blocks(self) -> int:
        return len(self._by_key)

    def lookup(self, keys: Sequence[BlockKey]) -> list[int]:
        """Pages already holding the leading ``keys``; each is referenced until released."""
        pages = []
        for key in keys:
            page = self._by_key.get(key)
            if page is None:
                break
            self._idle.pop(page, None)
            self._refs[page] += 1
            pages.append(page)
        return pages

    def allocate(self, n: int) -> list[int]:
        """``n`` pages for one request, taking idle cached pages (oldest first) when no free
        page is left; all or nothing."""
        if n > self.available:
            raise CacheFull(f"{n} KV pages needed, {self.available} of {self.num_pages} available")
        pages = []
        for _ in range(n):
            if self._free:
                page = self._free.pop()
            else:
                page, _ = self._idle.popitem(last=False)
                key = self._key_of.pop(page)
                del self._by_key[key]
                self.events.removed([key], self.node, self.medium, Reason.EVICTED)
            self._refs[page] = 1
            pages.append(page)
        return pages

    def retain(self, pages: Sequence[int]) -> None:
        for page in pages:
            if self._refs[page] <= 0:
                raise KVPoolError(f"page {page} is not in use; cannot retain it")
            self._refs[page] += 1

    def publish(self, page: int, key: BlockKey, parent: BlockKey | None = None,
                reason: Reason = Reason.COMPUTED) -> None:
        """The page holds the complete block ``key``: later requests may reuse it."""
        if key in self._by_key or page in self._key_of:
            return
        self._key_of[page] = key
        self._by_key[key] = page
        self.events.stored([key], self.node, self.medium, reason, parent=parent,
                           block_size=self.block_tokens)

    def release(self, pages: Sequence[int]) -> None:
        """Drop one reference to each page (a request's pages in prefix order); idle pages
        are queued leaves first, so eviction takes the end of a prefix before its start."""
        for page in reversed(pages):
            if self._refs[page] <= 0:
                raise KVPoolError(f"page {page} released more often than allocated")
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._key_of:
                    self._idle[page] = None
                else:
                    self._free.append(page)

    def check(self) -> None:
        """Every page is exactly one of: in use, idle with a key, free."""
        in_use = {p for p in range(self.num_pages) if self._refs[p] > 0}
        idle, free = set(self._idle), set(self._free)
        assert len(free) == len(self._free), "a page is twice on the free list"
        assert not (in_use & idle) and not (in_use & free) and not (idle & free)
        assert in_use | idle | free == set(range(self.num_pages)), "a page is lost"
        assert all(self._by_key[k] == p for p, k in self._key_of.items())
