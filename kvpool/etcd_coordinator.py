"""The coordinator over a real etcd server, for a pool spread across nodes.

etcd leases count whole seconds, so TTLs round up. Connection failures surface as
Unavailable, which callers treat as retryable.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import Any

import aetcd
from aetcd import transactions
from aetcd.exceptions import ClientError

from kvpool.coordinator import EventKind, LeaseExpired, WatchEvent
from kvpool.errors import BadRequest, Unavailable


def parse_endpoint(endpoints: str) -> tuple[str, int]:
    """The first of 'host:port[,host:port...]' (an http:// prefix is allowed)."""
    first = endpoints.split(",")[0].strip().removeprefix("http://")
    host, _, port = first.rpartition(":")
    if not host or not port.isdigit():
        raise BadRequest(f"etcd endpoint {first!r} is not host:port")
    return host, int(port)


class EtcdCoordinator:
    def __init__(self, endpoints: str, timeout_s: float = 5.0) -> None:
        host, port = parse_endpoint(endpoints)
        self.endpoint = f"{host}:{port}"
        self._client = aetcd.Client(host=host, port=port, timeout=timeout_s)

    async def _call(self, coro: Any) -> Any:
        try:
            return await coro
        except ClientError as exc:
            raise Unavailable(f"etcd at {self.endpoint}: {type(exc).__name__}: {exc}; "
                              "is etcd running?") from None

    async def grant_lease(self, ttl_s: float) -> int:
        lease = await self._call(self._client.lease(max(1, math.ceil(ttl_s))))
        return int(lease.id)

    async def keepalive(self, lease: int) -> None:
        reply = await self._call(self._client.refresh_lease(lease))
        if reply is None or reply.TTL <= 0:
            raise LeaseExpired(f"lease {lease:x} has expired")

    async def revoke(self, lease: int) -> None:
        with contextlib.suppress(Unavailable):  # revoking an expired lease is not an error
            await self._call(self._client.revoke_lease(lease))

    async def put(self, key: str, value: bytes, lease: int | None = None) -> None:
        try:
            await self._client.put(key.encode(), value, lease=lease)
        except ClientError as exc:
            if lease is not None and "lease not found" in str(exc):
                raise LeaseExpired(f"lease {lease:x} has expired") from None
            raise Unavailable(f"etcd at {self.endpoint}: {exc}") from None

    async def get(self, key: str) -> bytes | None:
        item = await self._call(self._client.get(key.encode()))
        return None if item is None else item.value

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        items = await self._call(self._client.get_prefix(prefix.encode()))
        return {kv.key.decode(): kv.value for kv in items}

    async def delete(self, key: str) -> bool:
        result = await self._call(self._client.delete(key.encode()))
        return bool(result and result.deleted)

    async def compare_and_set(self, key: str, expected: bytes | None, value: bytes,
                              lease: int | None = None) -> bool:
        k = key.encode()
        compare = (transactions.Version(k) == 0) if expected is None else (transactions.Value(k) == expected)
        succeeded, _ = await self._call(self._client.transaction(
            compare=[compare], success=[transactions.Put(k, value, lease=lease)], failure=[]))
        return bool(succeeded)

    async def watch_prefix(self, prefix: str) -> "_EtcdWatch":
        watch = await self._call(self._client.watch_prefix(prefix.encode()))
        return _EtcdWatch(watch)

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._client.close()


class _EtcdWatch:
    def __init__(self, watch: Any) -> None:
        self._watch = watch
        self._events = watch.__aiter__()

    def __aiter__(self) -> "_EtcdWatch":
        return self

    async def __anext__(self) -> WatchEvent:
        try:
            event = await self._events.__anext__()
        except ClientError as exc:
            raise Unavailable(f"the etcd watch broke: {exc}") from None
        kind = EventKind.PUT if event.kind == aetcd.EventKind.PUT else EventKind.DELETE
        return WatchEvent(kind, event.kv.key.decode(),
                          event.kv.value if kind is EventKind.PUT else None)

    async def aclose(self) -> None:
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await self._watch.cancel()
