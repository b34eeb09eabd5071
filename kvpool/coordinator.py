"""The coordinator interface (leased keys, watch, compare-and-set) and its in-process form.

Shaped after etcd v3, which the cluster mode plugs in behind the same interface; the
in-process implementation lets one command run the whole pool with no etcd. Keys are
strings under ``/kvpool/<cluster>/``; values are bytes.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import time
from contextlib import suppress
from dataclasses import dataclass
from typing import Protocol

from kvpool.errors import LeaseExpired  # raised here; defined with the other errors


class EventKind(enum.Enum):
    PUT = "put"
    DELETE = "delete"


@dataclass(frozen=True, slots=True)
class WatchEvent:
    kind: EventKind
    key: str
    value: bytes | None


class Watch(Protocol):
    def __aiter__(self) -> "Watch": ...

    async def __anext__(self) -> WatchEvent: ...

    async def aclose(self) -> None: ...


class Coordinator(Protocol):
    async def grant_lease(self, ttl_s: float) -> int: ...

    async def keepalive(self, lease: int) -> None:
        """Renew a lease for another TTL; raises LeaseExpired when it is gone."""

    async def revoke(self, lease: int) -> None: ...

    async def put(self, key: str, value: bytes, lease: int | None = None) -> None: ...

    async def get(self, key: str) -> bytes | None: ...

    async def get_prefix(self, prefix: str) -> dict[str, bytes]: ...

    async def delete(self, key: str) -> bool: ...

    async def compare_and_set(self, key: str, expected: bytes | None, value: bytes,
                              lease: int | None = None) -> bool:
        """Write ``value`` only if the current value is ``expected`` (None: key absent)."""

    async def watch_prefix(self, prefix: str) -> "Watch":
        """Events for keys under ``prefix`` from the moment this returns, lease expiries
        included. Close it with ``aclose``."""

    async def close(self) -> None: ...


@dataclass(slots=True)
class _Lease:
    ttl_s: float
    deadline: float
    keys: set[str]


class InProcessCoordinator:
    """The single-node coordinator: a dict, leases swept by one background task."""

    def __init__(self) -> None:
        self._data: dict[str, tuple[bytes, int | None]] = {}
        self._leases: dict[int, _Lease] = {}
        self._ids = itertools.count(1)
        self._watchers: list[tuple[str, asyncio.Queue[WatchEvent]]] = []
        self._sweeper: asyncio.Task[None] | None = None

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            for lease_id in [i for i, l in self._leases.items() if l.deadline <= now]:
                self._expire(lease_id)

    def _expire(self, lease_id: int) -> None:
        lease = self._leases.pop(lease_id, None)
        for key in sorted(lease.keys if lease else ()):
            if self._data.get(key, (None, None))[1] == lease_id:
                del self._data[key]
                self._notify(WatchEvent(EventKind.DELETE, key, None))

    def _notify(self, event: WatchEvent) -> None:
        for prefix, queue in self._watchers:
            if event.key.startswith(prefix):
                queue.put_nowait(event)

    async def grant_lease(self, ttl_s: float) -> int:
        self._ensure_sweeper()
        lease_id = next(self._ids)
        self._leases[lease_id] = _Lease(ttl_s, time.monotonic() + ttl_s, set())
        return lease_id

    async def keepalive(self, lease: int) -> None:
        entry = self._leases.get(lease)
        if entry is None:
            raise LeaseExpired(f"lease {lease} has expired")
        entry.deadline = time.monotonic() + entry.ttl_s

    async def revoke(self, lease: int) -> None:
        self._expire(lease)

    def _set(self, key: str, value: bytes, lease: int | None) -> None:
        if lease is not None:
            if lease not in self._leases:
                raise LeaseExpired(f"lease {lease} has expired")
            self._leases[lease].keys.add(key)
        self._data[key] = (value, lease)
        self._notify(WatchEvent(EventKind.PUT, key, value))

    async def put(self, key: str, value: bytes, lease: int | None = None) -> None:
        self._set(key, value, lease)

    async def get(self, key: str) -> bytes | None:
        item = self._data.get(key)
        return item[0] if item else None

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        return {k: v for k, (v, _) in sorted(self._data.items()) if k.startswith(prefix)}

    async def delete(self, key: str) -> bool:
        if self._data.pop(key, None) is None:
            return False
        self._notify(WatchEvent(EventKind.DELETE, key, None))
        return True

    async def compare_and_set(self, key: str, expected: bytes | None, value: bytes,
                              lease: int | None = None) -> bool:
        if await self.get(key) != expected:
            return False
        self._set(key, value, lease)
        return True

    async def watch_prefix(self, prefix: str) -> "Watch":
        return _Watch(self._watchers, prefix)

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None


class _Watch:
    """An iterator of one prefix's events; registered on creation, removed on aclose."""

    def __init__(self, watchers: list[tuple[str, asyncio.Queue[WatchEvent]]], prefix: str) -> None:
        self._queue: asyncio.Queue[WatchEvent] = asyncio.Queue()
        self._entry = (prefix, self._queue)
        self._watchers = watchers
        watchers.append(self._entry)

    def __aiter__(self) -> "_Watch":
        return self

    async def __anext__(self) -> WatchEvent:
        return await self._queue.get()

    async def aclose(self) -> None:
        if self._entry in self._watchers:
            self._watchers.remove(self._entry)
