"""The pool daemon: owns a node's tiers, registers its arenas with NIXL, keeps its
membership alive, and moves blocks between tiers when the master says so.

Engines' bytes never pass through this process's Python code: clients READ and WRITE the
arenas through NIXL. The daemon only copies bytes when it moves a block between tiers.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any

from aiohttp import web

from kvpool.codec import BlockHeader
from kvpool.config import DaemonConfig
from kvpool.coordinator import Coordinator
from kvpool.errors import BadRequest, BlockNotFound, ChecksumMismatch, KVPoolError, NodeGone, TierFull
from kvpool.keys import parse_key
from kvpool.membership import Membership
from kvpool.tiers.arena import ArenaTier
from kvpool.tiers.base import Tier, TierInfo, TierKind
from kvpool.tiers.factory import open_tiers
from kvpool.transfer import TransferAgent
from kvpool.wire import MAX_BODY, RpcClient, error_middleware, need, rpc_endpoint

log = logging.getLogger(__name__)


class PoolDaemon:
    def __init__(self, cfg: DaemonConfig) -> None:
        self.cfg = cfg
        self.tiers: dict[TierKind, Tier] = {}
        self.agent_name = f"kvpool-{cfg.node_id}-{uuid.uuid4().hex[:8]}"
        self.agent: TransferAgent | None = None
        self._executor = ThreadPoolExecutor(max(1, cfg.io_threads), thread_name_prefix="kvpool-io")
        self._runner: web.AppRunner | None = None
        self._master: RpcClient | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._coord: Coordinator | None = None
        self.membership: Membership | None = None
        self.url = ""

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> "PoolDaemon":
        """Open the tiers, serve, and join: through etcd when ``etcd`` is set (the leading
        master pulls the inventory), else by registering with ``master_url``."""
        if not self.cfg.master_url and not self.cfg.etcd:
            raise BadRequest("the daemon needs master_url (flag --master or KVPOOL_DAEMON_MASTER_URL) "
                             "or etcd (flag --etcd or KVPOOL_DAEMON_ETCD)")
        try:
            return await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> "PoolDaemon":
        loop = asyncio.get_running_loop()
        self.tiers = await loop.run_in_executor(self._executor, open_tiers, self.cfg, self._executor)
        self.agent = TransferAgent(self.agent_name)
        for tier in self.tiers.values():
            if isinstance(tier, ArenaTier):
                self.agent.register(tier.address, tier.capacity, tier.mem_type, tier.device_id, tier)
        self._runner = web.AppRunner(self._app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.cfg.host, self.cfg.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://{self.cfg.host}:{port}"
        if self.cfg.etcd:
            from kvpool.etcd_coordinator import EtcdCoordinator

            self._coord = EtcdCoordinator(self.cfg.etcd, timeout_s=max(1.0, self.cfg.node_ttl_s / 2))
            self.membership = Membership(self._coord, self.cfg.cluster, self.cfg.node_id,
                                         self.cfg.node_ttl_s, self.describe, self.agent.metadata())
            await self.membership.join()
            self.membership.start()
        else:
            self._master = RpcClient(self.cfg.master_url, timeout_s=30.0)
            await self._register(deadline_s=30.0)
            self._heartbeat = loop.create_task(self._heartbeat_forever(), name="daemon-heartbeat")
        log.info("daemon %s serving at %s with tiers %s", self.cfg.node_id, self.url,
                 ", ".join(f"{k.value}={t.capacity}" for k, t in self.tiers.items()))
        return self

    async def stop(self) -> None:
        if self.membership is not None:
            await self.membership.leave()
        if self._coord is not None:
            await self._coord.close()
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with suppress(asyncio.CancelledError):
                await self._heartbeat
        if self._master is not None:
            await self._master.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self.agent is not None:
            self.agent.close()
            for region in self.agent.regions:
                self.agent.deregister(region)
        for tier in self.tiers.values():
            await tier.close()
        self._executor.shutdown(wait=True)

    # -- membership -----------------------------------------------------------------------

    def tier_infos(self) -> list[TierInfo]:
        return [TierInfo(k, t.capacity, t.used(), len(t)) for k, t in self.tiers.items()]

    def registration(self) -> dict[str, Any]:
        assert self.agent is not None
        tiers = []
        for kind, tier in self.tiers.items():
            item: dict[str, Any] = {"kind": kind.value, "capacity": tier.capacity}
            if isinstance(tier, ArenaTier):
                item.update(address=tier.address, mem_type=tier.mem_type, device=tier.device_id)
            if getattr(tier, "shared", False):
                item["store"] = f"{self.cfg.s3_endpoint}|{tier.url}"  # type: ignore[attr-defined]
            tiers.append(item)
        return {"node_id": self.cfg.node_id, "url": self.url, "agent": self.agent_name,
                "metadata": self.agent.metadata(), "tiers": tiers, "inventory": self.inventory()}

    def describe(self) -> dict[str, Any]:
        """The value of this node's membership key: enough to reach it and size it up."""
        return {"url": self.url, "agent": self.agent_name,
                "tiers": {k.value: t.capacity for k, t in self.tiers.items()}}

    def inventory(self) -> list[dict[str, Any]]:
        return [{"key": b.key, "tier": kind.value, "location": b.location, "size": b.size,
                 "header": b.header.encode()}
                for kind, tier in self.tiers.items() for b in tier.inventory()]

    async def _register(self, deadline_s: float) -> None:
        assert self._master is not None
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        while True:
            try:
                await self._master.call("register", self.registration())
                return
            except KVPoolError as exc:
                if not exc.retryable or loop.time() > end:
                    raise
                await asyncio.sleep(0.2)

    async def _heartbeat_forever(self) -> None:
        assert self._master is not None
        while True:
            await asyncio.sleep(self.cfg.heartbeat_s)
            try:
                await self._master.call("heartbeat", {"node_id": self.cfg.node_id,
                                                      "agent": self.agent_name})
            except NodeGone:
                log.warning("the master dropped this node; registering again")
                with suppress(KVPoolError):
                    await self._register(deadline_s=self.cfg.heartbeat_s)
            except KVPoolError as exc:
                log.warning("heartbeat to %s failed: %s", self.cfg.master_url, exc)

    # -- commands from the master ---------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[error_middleware])
        app.router.add_get("/v1/d/rpc", rpc_endpoint({
            "adopt": self.adopt, "copy": self.copy, "drop": self.drop,
            "inventory": self.inventory_handler, "health": self.health,
            "registration": self.registration_handler}))
        app.router.add_get("/healthz", self.healthz)
        return app

    def _tier(self, name: Any) -> Tier:
        try:
            return self.tiers[TierKind(name)]
        except (ValueError, KeyError):
            raise BadRequest(f"this node has no tier {name!r}") from None

    async def adopt(self, body: dict[str, Any]) -> Any:
        """Record blocks a client wrote into an arena through NIXL (the master's commit)."""
        keys = [parse_key(k) for k in need(body, "keys", list)]
        tiers, locations = need(body, "tiers", list), need(body, "locations", list)
        headers = need(body, "headers", list)
        if not len(keys) == len(tiers) == len(locations) == len(headers):
            raise BadRequest("adopt needs keys, tiers, locations and headers of equal length")
        for key, tier_name, location, raw in zip(keys, tiers, locations, headers):
            tier = self._tier(tier_name)
            if not isinstance(tier, ArenaTier):
                raise BadRequest(f"tier {tier_name} is not an arena")
            header, _ = BlockHeader.decode(bytes(raw))
            tier.adopt(key, header, int(location))
        return {"adopted": len(keys)}

    async def copy(self, body: dict[str, Any]) -> Any:
        """Copy blocks between this node's tiers; the source keeps its copy."""
        keys = [parse_key(k) for k in need(body, "keys", list)]
        src, dst = self._tier(body.get("src")), self._tier(body.get("dst"))
        locations = need(body, "locations", list)
        statuses, sizes = [], []
        for key, location in zip(keys, locations):
            try:
                header, payload = await src.read(key)
                stored = await dst.write(key, header, payload, int(location))
                statuses.append("ok")
                sizes.append(stored.size)
            except ChecksumMismatch as exc:
                log.warning("block %s in %s failed its checksum and was dropped: %s",
                            key.hex(), src.kind.value, exc)
                statuses.append("corrupt")
                sizes.append(0)
            except BlockNotFound:
                statuses.append("missing")
                sizes.append(0)
            except TierFull:
                statuses.append("full")
                sizes.append(0)
        return {"status": statuses, "sizes": sizes}

    async def drop(self, body: dict[str, Any]) -> Any:
        tier = self._tier(body.get("tier"))
        dropped = 0
        for key in need(body, "keys", list):
            dropped += await tier.remove(parse_key(key))
        return {"dropped": dropped}

    async def inventory_handler(self, body: dict[str, Any]) -> Any:
        return {"inventory": self.inventory()}

    async def registration_handler(self, body: dict[str, Any]) -> Any:
        """What a newly elected master pulls: tiers, NIXL metadata and the whole inventory
        (with ``rescan``, a shared object store is listed again first, so blocks that
        nodes gone since wrote there are found)."""
        if body.get("rescan"):
            for tier in self.tiers.values():
                if getattr(tier, "shared", False):
                    await tier.rescan()  # type: ignore[attr-defined]
        return self.registration()

    async def health(self, body: dict[str, Any]) -> Any:
        return {"node_id": self.cfg.node_id, "agent": self.agent_name,
                "tiers": {i.kind.value: [i.capacity, i.used, i.blocks] for i in self.tier_infos()}}

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response(await self.health({}))
