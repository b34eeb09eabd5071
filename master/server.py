"""Running a master: the HTTP site plus its background loops (sweep, membership watch)."""

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
    """A started master; ``url`` is where engines and daemons reach it."""

    def __init__(self, cfg: MasterConfig, coordinator: Coordinator | None = None) -> None:
        self.cfg = cfg
        self.coord = coordinator or InProcessCoordinator()
        self.core = MasterCore(cfg, self.coord)
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.url = ""

    async def start(self) -> "MasterServer":
        self._runner = web.AppRunner(MasterHttp(self.core).app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.cfg.host, self.cfg.port)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://{self.cfg.host}:{port}"
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._sweep_forever(), name="master-sweep"),
                       loop.create_task(self.core.watch_membership(), name="master-membership")]
        log.info("master serving at %s", self.url)
        return self

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.sweep_interval_s)
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
        for node in list(self.core.nodes.values()):
            await node.link.close()
        if self._runner is not None:
            await self._runner.cleanup()
        await self.coord.close()
