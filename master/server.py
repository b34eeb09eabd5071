"""Running a master: the HTTP site plus its background loops (sweep, membership, and with
etcd the election), all owned by one TaskGroup."""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress

from aiohttp import web

from kvpool.auth import guard_bind, server_tls
from kvpool.config import MasterConfig
from kvpool.coordinator import Coordinator, InProcessCoordinator
from kvpool.streamrpc import StreamRpcServer
from master.core import MasterCore, Role
from master.election import Election
from master.http import EAGER, ROLES, MasterHttp

log = logging.getLogger(__name__)
SHUTDOWN_S = 2.0  # how long a stop waits for open connections to finish


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
        self.core = MasterCore(cfg, self.coord, clustered=self.clustered,
                               leader_url=lambda: self.leader_url,
                               lease_sure=lambda: self.election is None or self.election.sure)
        self.election: Election | None = None
        self._runner: web.AppRunner | None = None
        self._stream: StreamRpcServer | None = None
        self._main: asyncio.Task[None] | None = None
        self._group: asyncio.TaskGroup | None = None
        self._term: asyncio.Task[None] | None = None
        self.url = ""

    async def start(self) -> "MasterServer":
        guard_bind(self.cfg.host, self.cfg.credentials(), "the master")
        tls = server_tls(self.cfg.tls_cert, self.cfg.tls_key, "[master]")
        http = MasterHttp(self.core, self)
        self._stream = StreamRpcServer(http.rpc_handlers(), self.cfg.credentials(), ROLES, tls,
                                       eager=EAGER)
        await self._stream.start(self.cfg.host, self.cfg.rpc_port)
        # A connection still open at a stop (an RPC WebSocket, an event stream whose
        # reader stays) is cut after SHUTDOWN_S rather than aiohttp's 60 s.
        self._runner = web.AppRunner(http.app(self._stream), access_log=None,
                                     shutdown_timeout=SHUTDOWN_S)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.cfg.host, self.cfg.port, ssl_context=tls)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"{'https' if tls else 'http'}://{self.cfg.host}:{port}"
        if self.clustered:
            self.election = Election(self.coord, self.cfg.cluster, self.url, self.cfg.leader_ttl_s,
                                     self._lead, self._follow)
        started = asyncio.get_running_loop().create_future()
        self._main = asyncio.get_running_loop().create_task(self._run(started), name="master")
        await started
        log.info("master serving at %s%s", self.url, " (cluster mode, etcd)" if self.clustered else "")
        return self

    async def _run(self, started: asyncio.Future[None]) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                group.create_task(self._sweep_forever(), name="master-sweep")
                if self.election is not None:
                    group.create_task(self.election.run(), name="master-election")
                else:
                    group.create_task(self.core.members.watch(), name="master-membership")
                started.set_result(None)
        finally:
            self._group = None

    @property
    def leader_url(self) -> str:
        return self.election.leader_url if self.election is not None else self.url

    async def _lead(self, resumed: bool, generation: int) -> None:
        await self.core.begin_term(resumed, generation)
        assert self._group is not None
        self._term = self._group.create_task(self.core.members.follow(self.core.rebuilt),
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
            if self.core.role is not Role.LEADER or not self.core.lease_sure():
                continue  # a paused leader moves nothing before etcd says it still leads
            try:
                await self.core.sweep()
            except Exception:  # one bad sweep must not stop the next
                log.exception("sweep failed")

    async def stop(self) -> None:
        if self._main is not None:
            self._main.cancel()
            try:
                await self._main
            except asyncio.CancelledError:
                pass
            except Exception:  # a loop that died before the stop: say so, stop anyway
                log.exception("the master's background loops failed")
            self._main = None
        self._term = None
        await self.core.close()
        if self._stream is not None:
            await self._stream.close()
        if self._runner is not None:
            await self._runner.cleanup()
        await self.coord.close()
