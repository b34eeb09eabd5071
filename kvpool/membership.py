"""A daemon's membership of a cluster: a leased ``nodes/<id>`` key in the coordinator.

The daemon joins by creating its key in one transaction (only if absent, so two live
daemons can never share an id) and renews the lease for as long as it runs. When the lease is lost (etcd restarted
without it, a long partition) it joins again; the leading master sees the new key and
pulls the daemon's inventory, so surviving blocks return to the index on their own.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from contextlib import suppress
from typing import Any, Callable

from kvpool.coordinator import Coordinator
from kvpool.daemon_link import probe
from kvpool.errors import KVPoolError, LeaseExpired, NodeIdTaken
from kvpool.keyspace import Keyspace

log = logging.getLogger(__name__)


class Membership:
    """Join, stay, rejoin. ``describe`` gives the key's value (url, agent, tiers)."""

    def __init__(self, coord: Coordinator, cluster: str, node_id: str, ttl_s: float,
                 describe: Callable[[], dict[str, Any]], token: str = "",
                 tls: ssl.SSLContext | None = None) -> None:
        self.coord = coord
        self.cluster = cluster
        self.keys = Keyspace(cluster)
        self.node_id = node_id
        self.ttl_s = ttl_s
        self._describe = describe
        self._token = token  # the cluster credential, to probe the holder of our node id
        self._tls = tls
        self.lease: int | None = None
        self._task: asyncio.Task[None] | None = None

    async def join(self, wait_s: float | None = None) -> None:
        """Create the node key. A key left by a dead daemon of the same id (its lease has
        not run out yet) is waited for; one held by a live daemon is refused."""
        loop = asyncio.get_running_loop()
        end = loop.time() + (self.ttl_s + 5.0 if wait_s is None else wait_s)
        key = self.keys.node(self.node_id)
        value = self._describe()
        waited = False
        while True:
            lease = await self.coord.grant_lease(self.ttl_s)
            if await self.coord.compare_and_set(key, None, json.dumps(value).encode(), lease):
                self.lease = lease
                log.info("node %s joined cluster %s (lease %x)", self.node_id, self.cluster, lease)
                return
            await self.coord.revoke(lease)
            raw = await self.coord.get(key)
            if raw is None:
                continue  # it went away meanwhile
            holder = json.loads(raw)
            if holder.get("agent") == value["agent"]:
                await self.coord.delete(key)  # our own key from a lease we gave up
                continue
            if await probe(str(holder.get("url", "")), str(holder.get("agent", "")),
                           token=self._token, tls=self._tls):
                raise NodeIdTaken(f"node id {self.node_id!r} is already in cluster "
                                  f"{self.cluster!r} (daemon at {holder.get('url')}); "
                                  "give this daemon another node_id")
            if not waited:
                log.info("node id %s is still held by %s, which does not answer: waiting for "
                         "its lease to run out", self.node_id, holder.get("url"))
                waited = True
            if loop.time() > end:
                raise NodeIdTaken(f"node id {self.node_id!r} is still held in etcd by "
                                  f"{holder.get('url')}, which does not answer; wait for its "
                                  f"lease ({self.ttl_s:.0f} s) to run out and start again")
            await asyncio.sleep(0.3)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._keep(), name="membership")

    async def _keep(self) -> None:
        """Renew the lease a few times per TTL; join again when it is gone."""
        failing = False
        while True:
            await asyncio.sleep(self.ttl_s / 4)
            try:
                if self.lease is None:
                    await self.join(wait_s=self.ttl_s * 3)
                else:
                    await self.coord.keepalive(self.lease)
                if failing:
                    log.info("node %s renews its membership again", self.node_id)
                failing = False
            except LeaseExpired:
                log.warning("node %s lost its membership lease; joining again", self.node_id)
                self.lease = None
            except KVPoolError as exc:  # etcd away: keep trying, the lease may survive
                if not failing:
                    log.warning("node %s cannot renew its membership (retrying): %s",
                                self.node_id, exc)
                failing = True

    async def leave(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with suppress(asyncio.CancelledError):
                await self._task
        if self.lease is not None:
            with suppress(KVPoolError):
                await self.coord.revoke(self.lease)  # the master drops us at once
            self.lease = None

