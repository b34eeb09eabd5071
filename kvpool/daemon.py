"""The pool daemon: owns a node's tiers, registers its arenas with NIXL, keeps its
membership alive, and moves blocks between tiers when the master says so.

Engines' bytes never pass through this process's Python code: clients READ and WRITE the
arenas through NIXL. The daemon only copies bytes when it moves a block between tiers.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from typing import Any, Sequence

import numpy as np
from aiohttp import web

from kvpool import auth, localcopy
from kvpool.auth import Credentials, Role
from kvpool.codec import BlockHeader
from kvpool.config import DaemonConfig
from kvpool.coordinator import Coordinator
from kvpool.daemon_link import (DAEMON_EAGER, DAEMON_ROLES, DAEMON_RPC_PATH, ArenaRegion, CopyResult,
                                DaemonCall, Fence, Health, InventoryPage, InventoryRequest,
                                InventorySnapshots, PinMark, Registration, RegionMetadata, SendItem,
                                SendTarget, take_marks, StoredBlock, TierDescription, daemon_endpoint)
from kvpool.daemon_metrics import CONTENT_TYPE as METRICS_TYPE
from kvpool.daemon_metrics import DaemonMetrics
from kvpool.errors import (BadRequest, BlockNotFound, ChecksumMismatch, Forbidden, KVPoolError,
                           NodeGone, TierFull, TransferFailed, Unauthorized)
from kvpool.keys import BlockKey
from kvpool.membership import Membership
from kvpool.protocol import Call
from kvpool.tiers.arena import ArenaTier
from kvpool.tiers.base import StoredBlock as TierBlock
from kvpool.tiers.base import Tier, TierInfo, TierKind
from kvpool.tiers.factory import open_tiers
from kvpool.transfer import Region, TransferAgent
from kvpool.streamrpc import StreamRpcServer
from kvpool.wire import MAX_BODY, RpcClient, close_all, error_middleware, refusal, rpc_endpoint

log = logging.getLogger(__name__)
_COPIES_IN_FLIGHT = 8  # blocks one copy call moves at once


class PoolDaemon:
    def __init__(self, cfg: DaemonConfig) -> None:
        self.cfg = cfg
        # The cluster credential: presented to the master, and the only one this daemon
        # answers (read once, at construction: a file:PATH that is missing fails here).
        self._token = auth.secret(cfg.cluster_token, "[daemon] cluster_token")
        self._credentials = Credentials.of({Role.CLUSTER: [self._token]})
        self._serve_tls = auth.server_tls(cfg.tls_cert, cfg.tls_key, "[daemon]")
        self._peer_tls = auth.client_tls(cfg.tls_ca, "[daemon] tls_ca")
        self.tiers: dict[TierKind, Tier] = {}
        # Pins of blocks held here, kept for the master (a new leader reads them back from
        # the inventory's pages); memory only: a restarted daemon's blocks come back unpinned.
        self.marks: dict[BlockKey, PinMark] = {}
        self._pages = InventorySnapshots(self._snapshot, self._stored, self._marks)
        # What the master may call, over either transport, past one fence (the newest
        # leader heard from: kvpool.daemon_link.Fence).
        self._calls = daemon_endpoint(self, Fence())
        # The name says who runs it, so a client on this host can copy directly (kvpool.localcopy).
        self.agent_name = f"kvpool-{cfg.node_id}-{uuid.uuid4().hex[:8]}{localcopy.identity()}"
        self.agent: TransferAgent | None = None
        # What each arena is registered with NIXL as: the whole arena until the master
        # names the tenants' regions (``regions``), then each region on its own.
        self._layout: list[ArenaRegion] = []
        self._registered: dict[TierKind, list[Region]] = {}
        self._executor = ThreadPoolExecutor(max(1, cfg.io_threads), thread_name_prefix="kvpool-io")
        self._runner: web.AppRunner | None = None
        self._stream: StreamRpcServer | None = None
        self._connections: set[web.WebSocketResponse] = set()  # the masters' open RPC links
        self._master: RpcClient | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._coord: Coordinator | None = None
        self.membership: Membership | None = None
        self.metrics = DaemonMetrics(cfg.node_id, self.tier_infos)
        self.url = ""

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> "PoolDaemon":
        """Open the tiers, serve, and join: through etcd when ``etcd`` is set (the leading
        master pulls the inventory), else by registering with ``master_url``."""
        if not self.cfg.master_url and not self.cfg.etcd:
            raise BadRequest("the daemon needs master_url (flag --master or KVPOOL_DAEMON_MASTER_URL) "
                             "or etcd (flag --etcd or KVPOOL_DAEMON_ETCD)")
        auth.guard_bind(self.cfg.host, self._credentials, f"daemon {self.cfg.node_id}")
        try:
            return await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> "PoolDaemon":
        loop = asyncio.get_running_loop()
        self.tiers = await loop.run_in_executor(self._executor, open_tiers, self.cfg, self._executor)
        self.metrics.prepare(list(self.tiers))
        self.agent = TransferAgent(self.agent_name, host=self.cfg.host)
        for kind, tier in self.tiers.items():
            if isinstance(tier, ArenaTier):
                self._registered[kind] = [self.agent.register(
                    tier.address, tier.capacity, tier.mem_type, tier.device_id, tier)]
        self._stream = StreamRpcServer(self._calls, self._credentials, DAEMON_ROLES,
                                       self._serve_tls, eager=DAEMON_EAGER,
                                       max_frame=MAX_BODY)  # every daemon call is bulk
        await self._stream.start(self.cfg.host, self.cfg.rpc_port)
        self._runner = web.AppRunner(self._app(), access_log=None, shutdown_timeout=2.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.cfg.host, self.cfg.port, ssl_context=self._serve_tls)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"{'https' if self._serve_tls else 'http'}://{self.cfg.host}:{port}"
        if self.cfg.etcd:
            from kvpool.etcd_coordinator import EtcdCoordinator

            self._coord = EtcdCoordinator(self.cfg.etcd, timeout_s=max(1.0, self.cfg.node_ttl_s / 2))
            self.membership = Membership(self._coord, self.cfg.cluster, self.cfg.node_id,
                                         self.cfg.node_ttl_s, self.describe,
                                         token=self._token, tls=self._peer_tls)
            await self.membership.join()
            self.membership.start()
        else:
            self._master = RpcClient(self.cfg.master_url, timeout_s=30.0, token=self._token,
                                     tls=self._peer_tls)
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
        if self._stream is not None:
            await self._stream.close()
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

    def _registration(self) -> Registration:
        assert self.agent is not None
        tiers = []
        for kind, tier in self.tiers.items():
            desc = TierDescription(kind, tier.capacity)
            if isinstance(tier, ArenaTier):
                desc = TierDescription(kind, tier.capacity, tier.address, tier.mem_type, tier.device_id)
            elif getattr(tier, "shared", False):
                desc = TierDescription(kind, tier.capacity,
                                       store=f"{self.cfg.s3_endpoint}|{tier.url}")  # type: ignore[attr-defined]
            tiers.append(desc)
        return Registration(self.cfg.node_id, self.url, self.agent_name, self.agent.metadata(),
                            self.cfg.node_ttl_s, tiers)

    def describe(self) -> dict[str, Any]:
        """The value of this node's membership key: enough to reach it and size it up."""
        value: dict[str, Any] = {"url": self.url, "agent": self.agent_name,
                                 "ttl_s": self.cfg.node_ttl_s,
                                 "tiers": {k.value: t.capacity for k, t in self.tiers.items()}}
        if self._token:  # shows the master this key is a cluster member's (kvpool.auth)
            value["proof"] = auth.membership_proof(self._token, self.cfg.node_id, self.url,
                                                   self.agent_name)
        return value

    def _snapshot(self) -> list[tuple[TierKind, TierBlock]]:
        """References to every tier's records now (their headers are encoded per page)."""
        return [(kind, b) for kind, tier in self.tiers.items() for b in tier.inventory()]

    @staticmethod
    def _stored(items: Sequence[tuple[TierKind, TierBlock]]) -> list[StoredBlock]:
        return [StoredBlock(b.key, kind, b.location, b.size, b.header.encode()) for kind, b in items]

    def _marks(self) -> dict[BlockKey, PinMark]:
        for key in [k for k, m in self.marks.items() if m.empty]:
            del self.marks[key]  # a soft pin that ran out
        return self.marks

    async def _register(self, deadline_s: float) -> None:
        assert self._master is not None
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline_s
        while True:
            try:
                await self._master.call(Call.REGISTER, self._registration().pack())
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
                await self._master.call(Call.HEARTBEAT, {"node_id": self.cfg.node_id,
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
        app.router.add_get(DAEMON_RPC_PATH, rpc_endpoint(
            self._calls, self._credentials, DAEMON_ROLES, bulk=frozenset(DaemonCall),
            connections=self._connections))
        if self._stream is not None:
            app.router.add_get(DAEMON_RPC_PATH + "/stream", self._stream.info())
        app.on_shutdown.append(lambda _app: close_all(self._connections))
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.prometheus)
        return app

    def _tier(self, kind: TierKind) -> Tier:
        tier = self.tiers.get(kind)
        if tier is None:
            raise BadRequest(f"this node has no {kind.value} tier")
        return tier

    # -- what the master asks (kvpool.daemon_link.DaemonLink) -----------------------------

    async def adopt(self, blocks: Sequence[StoredBlock]) -> None:
        """Record blocks a client wrote into an arena through NIXL (the master's commit).
        Every block is checked before any is recorded, and a span refused midway (out of
        bounds, overlapping) rolls back the ones recorded before it: a bad batch changes
        nothing."""
        checked = []
        for block in blocks:
            tier = self._tier(block.tier)
            if not isinstance(tier, ArenaTier):
                raise BadRequest(f"tier {block.tier.value} is not an arena")
            header, _ = BlockHeader.decode(block.header)
            checked.append((tier, block, header))
        recorded: list[tuple[ArenaTier, BlockKey]] = []
        try:
            for tier, block, header in checked:
                if not tier.contains(block.key):
                    tier.adopt(block.key, header, block.location)
                    recorded.append((tier, block.key))
        except KVPoolError:
            for tier, key in recorded:
                await tier.remove(key)
            raise
        self.metrics.adopted.inc(len(recorded))

    async def copy(self, keys: Sequence[BlockKey], src: TierKind, dst: TierKind,
                   locations: Sequence[int]) -> list[CopyResult]:
        """Copy blocks between this node's tiers; the source keeps its copy."""
        source, target = self._tier(src), self._tier(dst)
        m = self.metrics
        seconds, moved = m.copy_seconds.labels(src.value, dst.value), m.copy_bytes.labels(src.value, dst.value)
        room = asyncio.Semaphore(_COPIES_IN_FLIGHT)

        async def one(key: BlockKey, location: int) -> CopyResult:
            async with room:
                start = time.perf_counter()
                try:
                    header, payload = await source.read(key)
                    stored = await target.write(key, header, payload, location)
                except ChecksumMismatch as exc:
                    # The master forgets this replica and reuses its space: so must we (a
                    # cold tier's read dropped it already; an arena's record must go too, or
                    # the master's next block there is refused after its bytes were written
                    # over it).
                    if source.contains(key):
                        await source.remove(key)
                    log.warning("block %s in %s failed its checksum and was dropped: %s",
                                key.hex(), src.value, exc)
                    m.checksum_failures.labels(src.value).inc()
                    m.copy_errors.labels(src.value, dst.value, exc.code).inc()
                    return CopyResult(error=exc)
                except (BlockNotFound, TierFull) as exc:
                    m.copy_errors.labels(src.value, dst.value, exc.code).inc()
                    return CopyResult(error=exc)
                seconds.observe(time.perf_counter() - start)
                moved.inc(header.payload_size)
                return CopyResult(stored.size)

        # Several at once, so that their trips to the I/O threads overlap; every copy has
        # ended before the call answers (the master frees the targets of a failed call).
        done = await asyncio.gather(*(one(k, at) for k, at in zip(keys, locations)),
                                    return_exceptions=True)
        for result in done:
            if isinstance(result, BaseException):
                raise result
        return done  # type: ignore[return-value]

    async def send(self, target: SendTarget, items: Sequence[SendItem]) -> list[CopyResult]:
        """Write blocks into a peer's arena (a drain moves them off this node). Each is
        read here (a cold tier verifies its checksum on the way), staged in one registered
        buffer, and written with one NIXL WRITE under the target's deadline; a block that
        cannot be read is that block's error, a failed transfer fails the whole call. The
        deadline runs from the call's arrival: a daemon frozen meanwhile (its caller gave up
        and may have reused the space) does not write late."""
        assert self.agent is not None
        loop = asyncio.get_running_loop()
        end = loop.time() + target.deadline_s
        results: list[CopyResult | None] = [None] * len(items)
        staged: list[tuple[int, bytes | memoryview]] = []
        for i, item in enumerate(items):
            try:
                header, payload = await self._tier(item.tier).read(item.key)
                staged.append((i, payload))
                results[i] = CopyResult(header.payload_size)
            except ChecksumMismatch as exc:
                self.metrics.checksum_failures.labels(item.tier.value).inc()
                results[i] = CopyResult(error=exc)
            except BlockNotFound as exc:
                results[i] = CopyResult(error=exc)
        total = sum(len(p) for _, p in staged)
        if total:
            buf = np.empty(total, dtype=np.uint8)
            local, remote, off = [], [], 0
            for i, payload in staged:
                n = len(payload)
                buf[off:off + n] = np.frombuffer(payload, dtype=np.uint8)
                local.append((buf.ctypes.data + off, n, 0))
                remote.append((items[i].address, n, target.device))
                off += n
            left = end - loop.time()
            if left <= 0:
                raise TransferFailed(f"the send's {target.deadline_s:.0f} s deadline passed before "
                                     "its blocks were read; nothing was written")
            peer = self.agent.add_peer(target.metadata)
            region = self.agent.register(buf.ctypes.data, total, owner=buf)
            try:
                await self.agent.run("WRITE", peer, local, "DRAM", remote, target.mem_type, left)
            finally:
                self.agent.deregister(region)
            self.metrics.sent_bytes.inc(total)
        return [r if r is not None else CopyResult(error=BlockNotFound("not read")) for r in results]

    async def drop(self, tier: TierKind, keys: Sequence[BlockKey]) -> int:
        target = self._tier(tier)
        dropped = 0
        for key in keys:
            dropped += await target.remove(key)
            if key in self.marks and not any(t.contains(key) for t in self.tiers.values()):
                del self.marks[key]  # its pins leave with the last copy here
        self.metrics.dropped.inc(dropped)
        return dropped

    async def mark(self, marks: Sequence[PinMark]) -> None:
        take_marks(self.marks, marks)

    async def inventory(self, req: InventoryRequest) -> InventoryPage:
        return self._pages.page(req)

    async def registration(self, rescan: bool = False) -> Registration:
        """What a newly elected master pulls (with ``rescan``, a shared object store is
        listed again first, so blocks that nodes gone since wrote there are found)."""
        if rescan:
            for tier in self.tiers.values():
                if getattr(tier, "shared", False):
                    await tier.rescan()  # type: ignore[attr-defined]
        return self._registration()

    async def regions(self, regions: Sequence[ArenaRegion]) -> RegionMetadata:
        """Register each arena as the regions the master names, one NIXL registration per
        region, so a tenant's partial metadata grants its region's memory only. The same
        layout again (a new leader, a retried join) changes nothing. Checked whole first:
        a bad layout leaves the registrations as they were."""
        assert self.agent is not None
        by_tier: dict[TierKind, list[ArenaRegion]] = {}
        for r in regions:
            tier = self._tier(r.tier)
            if not isinstance(tier, ArenaTier):
                raise BadRequest(f"tier {r.tier.value} is not an arena")
            if r.offset + r.size > tier.capacity:
                raise BadRequest(f"region {r.name!r} [{r.offset}, {r.offset + r.size}) is outside "
                                 f"the {r.tier.value} arena of {tier.capacity} bytes")
            by_tier.setdefault(r.tier, []).append(r)
        for kind, parts in by_tier.items():
            parts.sort(key=lambda r: r.offset)
            for a, b in zip(parts, parts[1:]):
                if a.offset + a.size > b.offset:
                    raise BadRequest(f"regions {a.name!r} and {b.name!r} of {kind.value} overlap")
        if list(regions) != self._layout:
            for kind, parts in by_tier.items():
                tier = self.tiers[kind]
                assert isinstance(tier, ArenaTier)
                for old in self._registered.pop(kind, []):
                    self.agent.deregister(old)
                self._registered[kind] = [self.agent.register(
                    tier.address + r.offset, r.size, tier.mem_type, tier.device_id, tier)
                    for r in parts]
            self._layout = list(regions)
            log.info("arenas registered as %d regions: %s", len(regions),
                     ", ".join(f"{r.tier.value}/{r.name or 'common'}={r.size}" for r in regions))
        blobs = []
        for r in regions:
            tier = self.tiers[r.tier]
            assert isinstance(tier, ArenaTier)
            found = self.agent.find(tier.address + r.offset, r.size)
            assert found is not None
            blobs.append(self.agent.partial_metadata(found))
        return RegionMetadata(self.agent.metadata(), blobs)

    async def health(self) -> Health:
        return Health(self.cfg.node_id, self.agent_name,
                      {i.kind.value: [i.capacity, i.used, i.blocks] for i in self.tier_infos()})

    async def prometheus(self, request: web.Request) -> web.Response:
        """Metrics; with credentials configured, for the cluster credential (Prometheus
        scrapes daemons with it: configs/prometheus.yml)."""
        if self._credentials.enabled:
            try:
                auth.require(Role.CLUSTER, role=self._credentials.role_of(
                    request.headers.get(auth.AUTH_HEADER)), what="a daemon's /metrics")
            except (Unauthorized, Forbidden) as exc:
                return refusal(exc)
        return web.Response(body=self.metrics.render(), headers={"Content-Type": METRICS_TYPE})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response((await self.health()).pack())
