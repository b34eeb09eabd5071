"""The coordinator over a real etcd server, for a pool spread across nodes.

It takes every member of an etcd cluster (``host:port,host:port,...``) and talks to one at
a time: a member that refuses, times out or breaks a call's stream is swapped for the
next, and the call is tried again there, with backoff, until the coordinator's timeout
(which also rides out the raft election that follows the loss of etcd's leader). Leases,
keys and watches live in the etcd cluster, not in one member, so they survive the swap.
etcd leases count whole seconds, so TTLs round up. What still fails surfaces as
Unavailable, which callers treat as retryable.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from typing import Any, Awaitable, Callable

import aetcd
from aetcd import transactions
from aetcd.exceptions import (ClientError, ConnectionFailedError, ConnectionTimeoutError,
                              InternalError)

from kvpool.coordinator import EventKind, WatchEvent
from kvpool.errors import BadRequest, LeaseExpired, Unavailable


def _transient(exc: ClientError) -> bool:
    """A member refused, timed out, broke the call's stream as it died, or the etcd cluster
    is electing a raft leader: worth another try, on another member."""
    if isinstance(exc, (ConnectionFailedError, ConnectionTimeoutError, InternalError)):
        return True
    text = str(exc)
    return any(s in text for s in ("deadline exceeded", "leader changed", "no leader", "timed out"))


def parse_endpoints(endpoints: str) -> list[tuple[str, int]]:
    """'host:port[,host:port...]' (an http:// prefix is allowed) -> [(host, port), ...]."""
    out = []
    for item in endpoints.split(","):
        item = item.strip().removeprefix("http://")
        if not item:
            continue
        host, _, port = item.rpartition(":")
        if not host or not port.isdigit():
            raise BadRequest(f"etcd endpoint {item!r} is not host:port")
        out.append((host, int(port)))
    if not out:
        raise BadRequest("no etcd endpoint given; pass host:port[,host:port...]")
    return out


class EtcdCoordinator:
    def __init__(self, endpoints: str, timeout_s: float = 5.0) -> None:
        self._members = parse_endpoints(endpoints)
        self._timeout_s = timeout_s
        self._at = 0
        self._client = self._connect()

    @property
    def endpoint(self) -> str:
        """The member this coordinator talks to now."""
        host, port = self._members[self._at]
        return f"{host}:{port}"

    def _connect(self) -> aetcd.Client:
        host, port = self._members[self._at]
        # Each attempt gets half the call's time: a member that hangs (stopped, or cut
        # off) must leave time to try the next, or a leader's renewal fails on one stalled
        # member of three and it steps down while the other two would have answered.
        return aetcd.Client(host=host, port=port, timeout=max(0.5, self._timeout_s / 2))

    async def _swap(self, broken: aetcd.Client) -> None:
        """Move on to the next member, unless a concurrent call already did."""
        if self._client is not broken:
            return
        self._at = (self._at + 1) % len(self._members)
        self._client = self._connect()
        with contextlib.suppress(Exception):
            await broken.close()

    async def _call(self, op: Callable[[aetcd.Client], Awaitable[Any]]) -> Any:
        """Run ``op`` on the current member; while the failure is one another member (or a
        moment) may cure, move on to the next member and retry, with backoff, until the
        coordinator's timeout."""
        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + self._timeout_s, 0.05
        while True:
            client = self._client
            try:
                return await op(client)
            except asyncio.CancelledError:
                # grpc cancels the calls in flight on a channel a concurrent call's swap
                # closed: that is no cancellation of ours, so try again on the new member.
                task = asyncio.current_task()
                if client is self._client or (task is not None and task.cancelling()):
                    raise
                if loop.time() + delay > deadline:
                    raise Unavailable(f"no etcd member answered in {self._timeout_s:.1f} s "
                                      "(every member tried was swapped out)") from None
                continue
            except ClientError as exc:
                if "lease not found" in str(exc):
                    raise LeaseExpired(f"etcd: {exc}") from None
                if not _transient(exc):
                    raise Unavailable(f"etcd at {self.endpoint}: {type(exc).__name__}: {exc}") from None
                await self._swap(client)
                if loop.time() + delay > deadline:
                    members = ", ".join(f"{h}:{p}" for h, p in self._members)
                    raise Unavailable(f"no etcd member answered in {self._timeout_s:.1f} s "
                                      f"({members}): {type(exc).__name__}: {exc}; is etcd "
                                      "running, with a quorum of its members?") from None
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.5)

    async def grant_lease(self, ttl_s: float) -> int:
        lease = await self._call(lambda c: c.lease(max(1, math.ceil(ttl_s))))
        return int(lease.id)

    async def keepalive(self, lease: int) -> None:
        reply = await self._call(lambda c: c.refresh_lease(lease))
        if reply is None or reply.TTL <= 0:
            raise LeaseExpired(f"lease {lease:x} has expired")

    async def revoke(self, lease: int) -> None:
        with contextlib.suppress(Unavailable, LeaseExpired):  # an expired lease is no error
            await self._call(lambda c: c.revoke_lease(lease))

    async def put(self, key: str, value: bytes, lease: int | None = None) -> None:
        await self._call(lambda c: c.put(key.encode(), value, lease=lease))

    async def get(self, key: str) -> bytes | None:
        item = await self._call(lambda c: c.get(key.encode()))
        return None if item is None else item.value

    async def get_prefix(self, prefix: str) -> dict[str, bytes]:
        items = await self._call(lambda c: c.get_prefix(prefix.encode()))
        return {kv.key.decode(): kv.value for kv in items}

    async def delete(self, key: str) -> bool:
        result = await self._call(lambda c: c.delete(key.encode()))
        return bool(result and result.deleted)

    async def compare_and_set(self, key: str, expected: bytes | None, value: bytes,
                              lease: int | None = None) -> bool:
        k = key.encode()
        compare = (transactions.Version(k) == 0) if expected is None else (transactions.Value(k) == expected)
        succeeded, _ = await self._call(lambda c: c.transaction(
            compare=[compare], success=[transactions.Put(k, value, lease=lease)], failure=[]))
        return bool(succeeded)

    async def watch_prefix(self, prefix: str) -> "_EtcdWatch":
        """A watch on the current member; if that member dies the watch raises Unavailable,
        and the caller lists and watches again (on the next member)."""
        watch = await self._call(lambda c: c.watch_prefix(prefix.encode()))
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
