"""The event log: block stored / removed events for the admin stream (what a KV-aware
router reads)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from kvpool.keys import BlockKey
from kvpool.tiers.base import TierKind

BACKLOG = 10_000  # events queued per subscriber before a slow one misses some


class EventHub:
    def __init__(self) -> None:
        self._subs: set[asyncio.Queue[dict[str, Any]]] = set()

    def emit(self, kind: str, key: BlockKey, node: str, tier: TierKind | None = None,
             size: int = 0) -> None:
        if not self._subs:
            return
        event = {"type": kind, "key": key.hex(), "node": node,
                 "tier": tier.value if tier else None, "size": size, "ts": time.time()}
        for q in self._subs:
            if q.qsize() < BACKLOG:
                q.put_nowait(event)

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        """A queue of every event from now on (a bounded backlog); unsubscribe when done."""
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._subs.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[dict[str, Any]]) -> None:
        self._subs.discard(q)
