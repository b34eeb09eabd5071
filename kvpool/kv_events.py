"""KV events: what a KV-aware router follows to know which blocks sit where: the master
emits them for the pool's blocks, and an engine for its own KV pages (same records).

Events carry vLLM's meaning and field names (``BlockStored``, ``BlockRemoved``,
``AllBlocksCleared``; ``block_hashes``, ``parent_block_hash``, ``block_size``,
``token_ids``, ``medium``) plus the ``node`` that holds the replica, so Dynamo- and
llm-d-style indexers read them as they read an engine's. A tier move is a
``BlockStored`` at the new medium and a ``BlockRemoved`` at the old one, with a
``reason`` that says why.

The master keeps one bounded ring of recent events, each with an id that only grows
(ids start at the master's start time in microseconds, so a restarted or newly elected
master continues above the ids the last one handed out). A subscriber reads the ring
from the id it last saw; one that fell behind the ring, or names an id this master never
issued, is told how much it missed (``EventsLost``) instead of being skipped silently.
"""

from __future__ import annotations

import asyncio
import enum
import json
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

from kvpool import tracing
from kvpool.keys import BlockKey
from kvpool.tiers.base import TierKind

RING = 65_536  # events kept for subscribers that reconnect or read slowly


class EventType(enum.StrEnum):
    STORED = "BlockStored"
    REMOVED = "BlockRemoved"
    CLEARED = "AllBlocksCleared"
    LOST = "EventsLost"  # only on a stream: this subscriber missed events


class Reason(enum.StrEnum):
    """Why a replica appeared or went (a router may ignore it; an operator reads it)."""

    PUT = "put"
    INVENTORY = "inventory"  # a daemon (re)joined and reported what it holds
    PROMOTED = "promoted"
    DEMOTED = "demoted"
    EVICTED = "evicted"
    REMOVED = "removed"
    PURGED = "purged"
    DRAINED = "drained"  # moved off a node that is being drained
    REPLICATED = "replicated"  # copied again after it lost a copy, up to its replica count
    LOST = "lost"  # its node left, or its bytes failed their checksum
    COMPUTED = "computed"  # an engine computed the block into its own pages
    LOADED = "loaded"  # an engine loaded the block from the pool into its own pages


@dataclass(slots=True)
class KVEvent:
    id: int
    ts: float
    type: EventType
    block_hashes: tuple[BlockKey, ...] = ()
    node: str | None = None
    medium: TierKind | None = None
    reason: Reason | None = None
    parent_block_hash: BlockKey | None = None
    block_size: int | None = None  # tokens per block, when the writer said
    token_ids: list[int] | None = None  # only when the writer chose to send them
    namespace: str | None = None  # a purge's namespace root (hex) or model
    request_id: str | None = None  # the request whose pool call caused it (kvpool.tracing)
    scope: str = ""  # the tenant or shared namespace of its blocks ("": the default one)
    _sse: bytes = b""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "ts": self.ts, "type": self.type.value}
        if self.type is EventType.STORED or self.type is EventType.REMOVED:
            out["block_hashes"] = [k.hex() for k in self.block_hashes]
            out["medium"] = self.medium.value if self.medium is not None else None
            out["node"] = self.node
        if self.type is EventType.STORED:
            out["parent_block_hash"] = self.parent_block_hash.hex() if self.parent_block_hash else None
            out["block_size"] = self.block_size
            out["lora_id"] = None
            if self.token_ids is not None:
                out["token_ids"] = self.token_ids
        if self.reason is not None:
            out["reason"] = self.reason.value
        if self.namespace is not None:
            out["namespace"] = self.namespace
        if self.request_id is not None:
            out["request_id"] = self.request_id
        if self.scope:
            out["scope"] = self.scope
        return out

    def sse(self) -> bytes:
        """The event as one server-sent event (encoded once, however many read it)."""
        if not self._sse:
            self._sse = (f"id: {self.id}\nevent: {self.type.value}\n"
                         f"data: {json.dumps(self.to_json(), separators=(',', ':'))}\n\n").encode()
        return self._sse


@dataclass(frozen=True, slots=True)
class Gap:
    """What a subscriber missed: events after ``after`` up to (not including) ``resume``."""

    after: int
    resume: int
    missed: int | None  # None: unknown (an id from another master, or from the future)

    def sse(self) -> bytes:
        body = {"id": self.resume - 1, "ts": time.time(), "type": EventType.LOST.value,
                "after": self.after, "resume_from": self.resume, "missed": self.missed,
                "message": "this subscriber missed events (it fell behind the master's ring, "
                           "or its last id is not this master's): treat what it knows of the "
                           "pool as stale and resync"}
        return (f"id: {self.resume - 1}\nevent: {EventType.LOST.value}\n"
                f"data: {json.dumps(body, separators=(',', ':'))}\n\n").encode()


class EventHub:
    """The ring and the wake-up of its readers. Emitting is an append, so it is cheap
    on the hot path whether or not anyone listens."""

    def __init__(self, capacity: int = RING) -> None:
        self._ring: deque[KVEvent] = deque(maxlen=capacity)
        self._base = self._next = int(time.time() * 1_000_000)
        self._waiter: asyncio.Future[None] | None = None
        self.subscribers = 0
        self.closed = False  # the server is stopping: its streams end

    def close(self) -> None:
        """End every stream of this hub (its server is shutting down)."""
        self.closed = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def last_id(self) -> int:
        """The id of the latest event (one below the first id when none was emitted)."""
        return self._next - 1

    @property
    def first_id(self) -> int:
        """The oldest id still in the ring (the next one when the ring is empty)."""
        return self._ring[0].id if self._ring else self._next

    def _add(self, event_type: EventType, **fields: Any) -> KVEvent:
        event = KVEvent(self._next, time.time(), event_type, request_id=tracing.current(), **fields)
        self._next += 1
        self._ring.append(event)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        return event

    def stored(self, keys: Sequence[BlockKey], node: str, medium: TierKind, reason: Reason, *,
               parent: BlockKey | None = None, block_size: int | None = None,
               token_ids: list[int] | None = None, scope: str = "") -> KVEvent:
        """``keys`` and ``parent`` as their writer named them; ``scope``: theirs."""
        return self._add(EventType.STORED, block_hashes=tuple(keys), node=node, medium=medium,
                         reason=reason, parent_block_hash=parent, block_size=block_size,
                         token_ids=token_ids, scope=scope)

    def removed(self, keys: Sequence[BlockKey], node: str, medium: TierKind,
                reason: Reason, scope: str = "") -> KVEvent:
        return self._add(EventType.REMOVED, block_hashes=tuple(keys), node=node, medium=medium,
                         reason=reason, scope=scope)

    def cleared(self, reason: Reason = Reason.PURGED) -> KVEvent:
        return self._add(EventType.CLEARED, reason=reason)

    def moved(self, key: BlockKey, node: str, src: TierKind, dst: TierKind, reason: Reason,
              parent: BlockKey | None = None, scope: str = "") -> None:
        """A replica went from one medium to another (the copy lands before the source goes)."""
        self.stored([key], node, dst, reason, parent=parent, scope=scope)
        self.removed([key], node, src, reason, scope=scope)

    def recent(self, n: int) -> list[KVEvent]:
        return list(self._ring)[-n:] if n > 0 else []

    def since(self, after: int, limit: int = 1024) -> tuple[Gap | None, list[KVEvent]]:
        """Events with ids above ``after`` (at most ``limit``), and the gap before them
        when some are no longer in the ring."""
        first, last = self.first_id, self.last_id
        gap = None
        if after > last or after < self._base - 1:  # not an id this master issued
            gap, after = Gap(after, first, None), first - 1
        elif after < first - 1:  # fell out of the ring
            gap, after = Gap(after, first, first - 1 - after), first - 1
        start = after + 1 - first  # ids in the ring are consecutive
        if start >= len(self._ring):
            return gap, []
        ring = self._ring
        return gap, [ring[i] for i in range(start, min(len(ring), start + limit))]

    async def wait(self, after: int, timeout: float) -> bool:
        """Until an event above ``after`` exists (True) or ``timeout`` passes (False)."""
        if self.last_id > after or self.closed:
            return self.last_id > after
        if self._waiter is None or self._waiter.done():
            self._waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait_for(asyncio.shield(self._waiter), timeout)
        except asyncio.TimeoutError:
            return False
        return True
