"""Running a master: the HTTP site plus its background loops (sweep, membership, and with
etcd the election)."""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress

from aiohttp import web

from kvpool.config import MasterConfig
from kvpool.coordinator import Coordinator, InProcessCoordinator
from master.core import MasterCore
from master.http import MasterHttp

log = logging.getLogger(__name__)


class MasterServer:
    """A started master; ``url`` is where engines and daemons reach it.

    Without etcd it leads alone and daemons register with it. With ``cfg.etcd`` it
    campaigns; while leading it follows the daemons' membership keys and serves once it
    has pulled every live daemon's inventory; otherwise it answers NotLeader.
    """

    def __init__(self, cfg: MasterConfig, coordinator: Coordinator | None = None) -> None:
        self.cfg = cfg
        if coordinator is None and cfg.etcd:
            from kvpool.etcd_coordinator import EtcdCoordinator

            coordinator = EtcdCoordinator(cfg.etcd, timeout_s=max(1.0, cfg.leader_ttl_s / 2))
        self.clustered = bool(cfg.etcd)
        self.coord = coordinator or InProcessCoordinator()
        self.core = MasterCore(cfg, self.coord)
        self.core.clustered = self.clustered
        self.election = None
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._term: asyncio.Task[None] | None = None
        self.url = ""

    async def start(self) -> "MasterServer":
        self._runner = web.AppRunner(MasterHttp(self.core, self).app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.cfg.host, self.cfg.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://{self.cfg.host}:{port}"
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._sweep_forever(), name="master-sweep")]
        if self.clustered:
            from master.election import Election

            await self.core.end_term()
            self.election = Election(self.coord, self.cfg.cluster, self.url, self.cfg.leader_ttl_s,
                                     self._lead, self._follow)
            self._tasks.append(loop.create_task(self.election.run(), name="master-election"))
        else:
            self._tasks.append(loop.create_task(self.core.watch_membership(), name="master-membership"))
        log.info("master serving at %s%s", self.url, " (cluster mode, etcd)" if self.clustered else "")
        return self

    @property
    def leader_url(self) -> str:
        return self.election.leader_url if self.election is not None else self.url

    async def _lead(self) -> None:
        from master.cluster import follow_members

        await self.core.begin_term()
        self._term = asyncio.get_running_loop().create_task(follow_members(self.core),
                                                            name="master-members")

    async def _follow(self) -> None:
        await self._stop_term()
        await self.core.end_term()

    async def _stop_term(self) -> None:
        if self._term is not None:
            self._term.cancel()
            with suppress(asyncio.CancelledError):
                await self._term
            self._term = None

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.sweep_interval_s)
            if not (self.core.leader and self.core.ready):
                continue
            try:
                await self.core.sweep()
            except Exception:  # one bad sweep must not stop the next
                log.exception("sweep failed")

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with suppress(asyncio.CancelledError):
                await task
        await self._stop_term()
        for node in list(self.core.nodes.values()):
            await node.link.close()
        if self._runner is not None:
            await self._runner.cleanup()
        await self.coord.close()
