"""The master's HTTP surface: msgpack RPC for engines and daemons, JSON admin API under /v1.

With credentials configured (kvpool.auth), every call but /healthz and /readyz needs one:
the RPC checks each call's role (ROLES), the admin API wants a viewer to read and an admin
to change anything."""

from __future__ import annotations

import json
import re
import time
from typing import Any

from aiohttp import web

from kvpool import auth
from kvpool import fields as f
from kvpool.auth import Role as Access
from kvpool.daemon_link import Registration
from kvpool.errors import BadRequest, BlockNotFound, KVPoolError
from kvpool.keys import BlockKey, parse_key
from kvpool.protocol import (AbortRequest, AgentsRequest, Call, CommitRequest, CorruptRequest,
                             HeartbeatRequest, KeysRequest, ReadGrant, ReleaseRequest, ReserveRequest,
                             pack_unreadable, released)
from kvpool.streamrpc import StreamRpcServer
from kvpool.tiers.base import TierKind
from kvpool.wire import (MAX_BODY, Handler, auth_middleware, close_all, error_middleware,
                         rpc_endpoint)
from master import catalog, removal
from master.core import MasterCore, Role
from master.drain_http import DrainRoutes, node_state
from master.index import BlockEntry
from master.nodes import Node, TierSpace
from master.openapi import OPENAPI
from master.ops_http import OpsRoutes


def _no_constant(name: str) -> Any:
    raise BadRequest(f"{name} is not a JSON number")


async def json_body(request: web.Request) -> dict[str, Any]:
    """An admin call's JSON body: a map (an empty body is an empty map). NaN, Infinity,
    nesting deeper than the parser can follow and anything but an object are BadRequest."""
    raw = await request.read()
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and bad UTF-8 are ValueErrors
        raise BadRequest(f"the body is not valid JSON: {str(exc)[:200]}") from None
    return f.body_map(body, f"the body of {request.method} {request.path}")


def _tier_kind(value: Any, what: str) -> TierKind:
    try:
        return TierKind(value)
    except ValueError:
        raise BadRequest(f"'{what}': unknown tier {value!r:.40}; one of "
                         f"{', '.join(k.value for k in TierKind)}") from None


_ENGINE = frozenset({Access.CLIENT})
# Who may make each RPC call (an admin credential also acts as a client's).
ROLES: dict[str, frozenset[Access]] = {
    **{c: _ENGINE for c in (Call.RESERVE, Call.COMMIT, Call.ABORT, Call.GET, Call.RELEASE,
                            Call.EXISTS, Call.MATCH, Call.REMOVE, Call.PIN, Call.UNPIN,
                            Call.CORRUPT)},
    Call.AGENTS: frozenset({Access.CLIENT, Access.CLUSTER}),
    Call.REGISTER: frozenset({Access.CLUSTER}), Call.HEARTBEAT: frozenset({Access.CLUSTER}),
    Call.CHECK: frozenset({Access.ADMIN}),
}
STREAM_INFO = "/v1/rpc/stream"  # where the stream RPC listens (kvpool.streamrpc)
# Calls whose handlers wait on nothing before their answer is known, or only on tasks of
# their own (a get's promotions): the stream RPC answers them without a task.
EAGER = frozenset({Call.GET, Call.RELEASE, Call.EXISTS, Call.MATCH, Call.ABORT, Call.PIN,
                   Call.UNPIN})
# "/": the status page, no data in it
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/", STREAM_INFO})
SCOPE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# What a tenant's viewer credential reads (filtered to its namespaces).
TENANT_PATHS = frozenset({"/v1/events", "/v1/tenants"})


class MasterHttp:
    def __init__(self, core: MasterCore, server: Any = None) -> None:
        self.core = core
        self.state = core.state
        self.tenancy = core.state.tenancy
        self.server = server  # the MasterServer, for who leads (None: always this one)
        self.ops = OpsRoutes(core)
        self.connections: set[web.WebSocketResponse] = set()  # open RPC connections

    def rpc_handlers(self) -> dict[str, Handler]:
        """The RPC's calls, served alike on the WebSocket and on the stream transport."""
        rpc: dict[Call, Handler] = {
            Call.RESERVE: self.reserve, Call.COMMIT: self.commit, Call.ABORT: self.abort,
            Call.GET: self.get, Call.RELEASE: self.release, Call.EXISTS: self.exists,
            Call.MATCH: self.match, Call.REMOVE: self.remove, Call.PIN: self.pin,
            Call.UNPIN: self.unpin, Call.AGENTS: self.agents, Call.CORRUPT: self.corrupt,
            Call.REGISTER: self.register, Call.HEARTBEAT: self.heartbeat, Call.CHECK: self.check,
        }
        return {n: self.ops.timed(n.value, self._releasing(h)) for n, h in rpc.items()}

    def app(self, stream: StreamRpcServer | None = None) -> web.Application:
        creds = self.core.cfg.credentials()
        app = web.Application(client_max_size=MAX_BODY, middlewares=[
            auth_middleware(creds, OPEN_PATHS, frozenset({"/v1/rpc"}), TENANT_PATHS), error_middleware])
        app.on_shutdown.append(self._shutdown)
        app.router.add_get("/v1/rpc", rpc_endpoint(self.rpc_handlers(), creds, ROLES,
                                                   bulk=frozenset({Call.REGISTER}),
                                                   connections=self.connections))
        if stream is not None:
            app.router.add_get(STREAM_INFO, stream.info())
        app.router.add_get("/v1/cluster", self.cluster)
        app.router.add_get("/v1/nodes", self.list_nodes)
        app.router.add_get("/v1/blocks/{key}", self.block)
        app.router.add_post("/v1/blocks/{key}/pin", self.admin_pin)
        app.router.add_post("/v1/blocks/{key}/unpin", self.admin_unpin)
        app.router.add_delete("/v1/blocks/{key}", self.admin_delete)
        app.router.add_post("/v1/evict", self.admin_evict)
        self.ops.add(app)  # /, /v1/events, /v1/stats, /v1/purge, /metrics
        DrainRoutes(self.core).add(app)  # /v1/nodes/{node}/drain
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)
        app.router.add_get("/openapi.json", self.openapi)
        return app

    async def _shutdown(self, app: web.Application) -> None:
        """A stop: close RPC connections, so none holds it up."""
        await close_all(self.connections)

    # -- RPC ------------------------------------------------------------------------------

    def _releasing(self, handler: Handler) -> Handler:
        """Only a ready leader serves; read leases the client is done with ride along on
        any call (checked before the call acts, released once its body decoded too)."""

        async def call(body: dict[str, Any]) -> Any:
            self.core.gate()
            leases = released(body)
            if leases:
                self.core.leases.release(leases)
            return await handler(body)

        return call

    # Every call that names keys names them as its scope's clients do: the scope (the
    # connection's tenant, master.tenants) turns them into the index's keys first.

    async def reserve(self, body: dict[str, Any]) -> Any:
        req = ReserveRequest.unpack(body)
        put_id, items = await self.core.puts.reserve(req.keys, req.sizes, req.parents, req.prefer,
                                                     req.replicas, catalog.parse(req.meta, len(req.keys)),
                                                     ttl_s=req.ttl_s, owner=auth.peer(),
                                                     scope=self.tenancy.current())
        # How long the reservation holds: past it, the writer must not write (the space
        # may be another block's by then).
        return {"put_id": put_id, "items": [r.pack() for r in items],
                "ttl_s": self.core.puts.ttl(req.ttl_s)}

    async def commit(self, body: dict[str, Any]) -> Any:
        req = CommitRequest.unpack(body)
        return {"committed": await self.core.puts.commit(req.put_id, req.keys, req.headers,
                                                         self.tenancy.current())}

    async def abort(self, body: dict[str, Any]) -> Any:
        req = AbortRequest.unpack(body)
        self.core.puts.abort(req.put_id, self.tenancy.current().keys(req.keys))
        return {}

    def _keys(self, body: dict[str, Any], call: Call) -> tuple[KeysRequest, list[BlockKey]]:
        req = KeysRequest.unpack(body, call)
        return req, self.tenancy.current().keys(req.keys)

    async def get(self, body: dict[str, Any]) -> Any:
        keys = self._keys(body, Call.GET)[1]
        lease, grants = await self.core.reads.get(keys)
        one = len(keys) == 1 and isinstance(grants[0], ReadGrant)
        return {"lease": lease,
                "items": [g.pack() if isinstance(g, ReadGrant) else None for g in grants],
                "ttl_s": self.core.cfg.read_lease_s,
                "keep_s": self.core.reads.keep(lease, keys[0]) if one else 0.0,
                "unreadable": pack_unreadable(grants)}

    async def release(self, body: dict[str, Any]) -> Any:
        self.core.leases.release(ReleaseRequest.unpack(body).leases)
        return {}

    async def exists(self, body: dict[str, Any]) -> Any:
        return {"present": await self.core.reads.exists(self._keys(body, Call.EXISTS)[1])}

    async def match(self, body: dict[str, Any]) -> Any:
        req, keys = self._keys(body, Call.MATCH)
        return {"count": await self.core.reads.match(keys, prefetch=req.prefetch)}

    async def remove(self, body: dict[str, Any]) -> Any:
        req, keys = self._keys(body, Call.REMOVE)
        if req.force:
            auth.require(Access.ADMIN, what="a forced remove (it ignores leases and pins)")
        return {"removed": await removal.remove(self.state, keys, req.force)}

    def _named(self, req: KeysRequest, keys: list[BlockKey]) -> BlockNotFound:
        """A miss as the caller named the key (not the index's scoped key)."""
        missing = next((n for n, k in zip(req.keys, keys) if self.state.index.readable(k) is None),
                       req.keys[0] if req.keys else b"")
        return BlockNotFound(f"no complete block {missing.hex()}")

    async def pin(self, body: dict[str, Any]) -> Any:
        req, keys = self._keys(body, Call.PIN)
        try:
            return {"pinned": await self.core.leases.pin(keys, req.ttl_s, req.prefix)}
        except BlockNotFound:
            raise self._named(req, keys) from None

    async def unpin(self, body: dict[str, Any]) -> Any:
        req, keys = self._keys(body, Call.UNPIN)
        try:
            return {"unpinned": await self.core.leases.unpin(keys, req.prefix)}
        except BlockNotFound:
            raise self._named(req, keys) from None

    async def agents(self, body: dict[str, Any]) -> Any:
        """NIXL metadata of daemons: a client's of its scope's arena region only (with
        tenant regions configured), so it cannot even address another tenant's blocks; the
        admin and the cluster see whole arenas. One blob per agent, or a list when the
        region spans several arenas (host and gpu); no names asked: every live daemon's."""
        agents = AgentsRequest.unpack(body).agents
        region = None
        if self.tenancy.shares and auth.current() not in (Access.ADMIN, Access.CLUSTER):
            region = self.tenancy.region_of(self.tenancy.current().name)
        found = self.core.members.agent_metadata(agents, region)
        return {"metadata": {a: blobs[0] if len(blobs) == 1 else blobs for a, blobs in found.items()}}

    async def corrupt(self, body: dict[str, Any]) -> Any:
        req = CorruptRequest.unpack(body)
        await self.core.reads.report_corrupt(self.tenancy.current().keys(req.keys), req.nodes)
        return {}

    async def register(self, body: dict[str, Any]) -> Any:
        return await self.core.members.register(Registration.unpack(body))

    async def heartbeat(self, body: dict[str, Any]) -> Any:
        req = HeartbeatRequest.unpack(body)
        await self.core.members.heartbeat(req.node_id, req.agent)
        return {}

    async def check(self, body: dict[str, Any]) -> Any:
        try:
            return await self.core.check()
        except AssertionError as exc:
            raise KVPoolError(f"invariant broken: {exc}") from None

    # -- admin ----------------------------------------------------------------------------

    @staticmethod
    def _compression(payload: int, stored: int) -> float:
        """Payload bytes per stored byte (cold tiers compress; arenas hold payloads as is)."""
        return round(payload / stored, 3) if stored else 1.0

    def tier_table(self) -> dict[str, dict[str, Any]]:
        usage = self.state.index.shown  # kept by the index: no view walks it
        table: dict[str, dict[str, Any]] = {}
        seen: set[tuple[str, TierKind]] = set()  # a shared store counts once, not once per node
        for node in self.state.nodes.values():
            for kind, space in node.tiers.items():
                owner = (self.state.owner(node, kind), kind)
                if owner in seen:
                    continue
                seen.add(owner)
                blocks, payload, stored = usage.get(owner, [0, 0, 0])
                row = table.setdefault(kind.value, {"capacity": 0, "used": 0, "blocks": 0,
                                                    "payload": 0, "stored": 0})
                row["capacity"] += space.capacity
                row["used"] += space.used
                row["blocks"] += blocks
                row["payload"] += payload
                row["stored"] += stored
        for row in table.values():
            row["compression"] = self._compression(row.pop("payload"), row.pop("stored"))
        return table

    async def cluster(self, request: web.Request) -> web.Response:
        complete = self.state.index.readable_blocks
        return web.json_response({
            "cluster": self.core.cfg.cluster, "ready": self.core.role is Role.LEADER,
            "leader": self.core.role.leads, "nodes": len(self.state.nodes), "blocks": complete,
            "pending": len(self.state.index) - complete, "tiers": self.tier_table()})

    async def list_nodes(self, request: web.Request) -> web.Response:
        usage = self.state.index.shown  # kept by the index: no view walks it

        def tier(n: Node, k: TierKind, s: TierSpace) -> dict[str, Any]:
            blocks, payload, stored = usage.get((self.state.owner(n, k), k), [0, 0, 0])
            return {"kind": k.value, "capacity": s.capacity, "used": s.used, "blocks": blocks,
                    "compression": self._compression(payload, stored),
                    "high_watermark": self.core.cfg.watermarks(k.value)[0],
                    "low_watermark": self.core.cfg.watermarks(k.value)[1],
                    "fragmentation": round(s.allocator.fragmentation, 4) if s.allocator else None,
                    "shared_store": s.store or None}

        return web.json_response({"nodes": [
            {"node_id": n.node_id, "url": n.url, "agent": n.agent, **node_state(n),
             "tiers": [tier(n, k, s) for k, s in sorted(n.tiers.items(), key=lambda kv: kv[0].rank)]}
            for n in self.state.nodes.values()]})

    def _entry(self, request: web.Request) -> BlockEntry:
        """The block a path names: by the index's key, or with ``?scope=`` by the key as
        that tenant's (or shared namespace's, or ``default``) events show it."""
        key = parse_key(request.match_info["key"])
        name = request.query.get("scope", "")
        if name:
            if not SCOPE_NAME.fullmatch(name):
                raise BadRequest(f"scope={name!r:.70}: a tenant's or shared namespace's name")
            scope = self.tenancy.scopes.get("" if name == "default" else name)
            if scope is None:
                raise BlockNotFound(f"no tenant or shared namespace {name!r} here")
            key = scope.key(key)
        entry = self.state.index.readable(key)
        if entry is None:
            raise BlockNotFound(f"no complete block {request.match_info['key']}"
                                + (f" in scope {name!r:.70}" if name else ""))
        return entry

    async def block(self, request: web.Request) -> web.Response:
        entry = self._entry(request)
        now = time.monotonic()
        return web.json_response({
            "key": entry.key.hex(), "size": entry.size, "state": entry.state.value,
            "pins": entry.pins, "leases": len([1 for e in entry.leases.values() if e > now]),
            "parent": entry.parent.hex() if entry.parent is not None else None,
            "soft_pinned": entry.soft_pinned(now),
            "replicas": [{"node": r.node, "tier": r.tier.value, "location": r.location,
                          "size": r.size, "node_state": self._owner_state(r.node)}
                         for r in entry.replicas]})

    def _owner_state(self, owner: str) -> str:
        """A replica owner's state: its node's, or ``shared`` for an object store."""
        node = self.state.nodes.get(owner)
        return node.state.value if node is not None else "shared" if owner.startswith("@") else "gone"

    async def admin_pin(self, request: web.Request) -> web.Response:
        await self.core.leases.pin([self._entry(request).key])
        return web.json_response({"pinned": True})

    async def admin_unpin(self, request: web.Request) -> web.Response:
        await self.core.leases.unpin([self._entry(request).key])
        return web.json_response({"pinned": False})

    async def admin_delete(self, request: web.Request) -> web.Response:
        entry = self._entry(request)
        raw = request.query.get("force", "false").lower()
        if raw not in ("1", "true", "0", "false"):
            raise BadRequest(f"force={raw!r}: give force=true or force=false")
        force = raw in ("1", "true")
        await removal.remove(self.state, [entry.key], force)
        return web.json_response({"removed": True})

    async def admin_evict(self, request: web.Request) -> web.Response:
        """Forced eviction: demote the coldest movable blocks of a tier down to a fill level."""
        body = await json_body(request)
        f.only(body, frozenset({"tier", "fill"}), "evict")
        tier = f.field(body, "tier", _tier_kind, TierKind.HOST)
        fill = f.field(body, "fill", f.number(0.0, 1.0), 0.0)
        moved = 0
        for node in list(self.state.nodes.values()):
            space = node.tiers.get(tier)
            if space is not None:
                before = space.used
                await self.core.tiering.relieve(node, tier, need=space.capacity - int(fill * space.capacity))
                moved += before - space.used
        return web.json_response({"freed_bytes": moved})

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(self, request: web.Request) -> web.Response:
        ready = self.core.role is Role.LEADER and self.core.lease_sure()
        leader = self.server.leader_url if self.server is not None else ""
        return web.json_response({"ready": ready, "leader": self.core.role.leads,
                                  "leader_url": leader, "nodes": len(self.state.nodes)},
                                 status=200 if ready else 503)

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(OPENAPI)
