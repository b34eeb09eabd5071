"""The operator's part of the master's HTTP surface: the KV event stream, ``/metrics``,
activity counters with the latest events (what the status page and ``kvpool top``
poll), purge, and the status page at ``/``.

The page itself is open (it holds no data); what it shows comes from the viewer
endpoints, with the viewer credential in the ``kvpool_token`` cookie when credentials are
configured (a browser's EventSource cannot send an Authorization header).
"""

from __future__ import annotations

import json
import time
from time import perf_counter
from typing import TYPE_CHECKING, Any

from aiohttp import web

from kvpool import auth
from kvpool.errors import BadRequest
from kvpool.keys import parse_key
from kvpool.tiers.base import TierKind
from kvpool.wire import Handler
from kvpool import event_stream, tracing
from master import removal
from master.metrics import CONTENT_TYPE, MasterMetrics
from master.status_page import PAGE

if TYPE_CHECKING:
    from master.core import MasterCore

RECENT_MAX = 500
# The counters /v1/stats reports (the page computes rates and the hit ratio from them).
STATS = ("committed", "reserved", "reclaimed", "get_hits", "get_misses", "match_hits",
         "match_misses", "promoted", "evicted", "removed", "purged", "expired")


class OpsRoutes:
    def __init__(self, core: "MasterCore") -> None:
        self.core = core
        self.metrics = MasterMetrics(core)
        self.spans = tracing.SpanRing("master")

    def add(self, app: web.Application) -> None:
        app.router.add_get("/", self.page)
        app.router.add_get("/v1/events", self.events)
        app.router.add_get("/v1/stats", self.stats)
        app.router.add_get("/v1/tenants", self.tenants)
        app.router.add_post("/v1/purge", self.purge)
        app.router.add_get("/metrics", self.prometheus)
        app.router.add_get("/v1/traces/{request_id}", self.trace)
        event_stream.end_on_shutdown(app, self.core.state.events)

    def timed(self, name: str, handler: Handler) -> Handler:
        """An RPC handler that observes its latency in kvpool_master_call_seconds; a call
        made for a request runs as that request's (kvpool.tracing): a span in the ring, a
        log line, and the request's id on the events it causes."""
        hist = self.metrics.call(name)
        spans = self.spans

        async def call(body: dict[str, Any]) -> Any:
            request_id, by = tracing.from_wire(body) if isinstance(body, dict) else (None, "")
            start = perf_counter()
            if request_id is None:
                try:
                    return await handler(body)
                finally:
                    hist.observe(perf_counter() - start)
            keys = body.get("keys")
            detail = f"{len(keys)} keys" if isinstance(keys, list) else ""
            error = ""
            with tracing.use(request_id):
                try:
                    return await handler(body)
                except BaseException as exc:
                    error = getattr(exc, "code", type(exc).__name__)
                    raise
                finally:
                    took = perf_counter() - start
                    hist.observe(took)
                    spans.add(name, time.time() - took, took, by=by, detail=detail, error=error)
                    tracing.note("%s from %s: %s%s in %.2f ms", name, by or "?", detail or "-",
                                 f" failed ({error})" if error else "", took * 1e3)

        return call

    async def trace(self, request: web.Request) -> web.Response:
        """The spans this master kept of one request's pool calls (``kvpool trace``)."""
        request_id = tracing.checked(request.match_info["request_id"])
        return web.json_response({"request_id": request_id, "where": "master",
                                  "spans": [s.to_json() for s in self.spans.get(request_id)]})

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(text=PAGE, content_type="text/html",
                            headers={"Cache-Control": "no-cache",
                                     "Content-Security-Policy": "default-src 'self'; "
                                     "style-src 'self' 'unsafe-inline'; script-src 'self' 'unsafe-inline'"})

    async def events(self, request: web.Request) -> web.StreamResponse:
        """A tenant's viewer sees its own namespaces' events only (master.tenants)."""
        st = self.core.state
        return await event_stream.stream(request, st.events, st.tenancy.visible(auth.tenant()))

    async def tenants(self, request: web.Request) -> web.Response:
        """Per scope (tenant, shared namespace, the default one): bytes and replicas held
        per tier against its quota, and puts in flight against its limit. A tenant's viewer
        sees its own rows only."""
        st = self.core.state
        tenancy = st.tenancy
        visible = tenancy.visible(auth.tenant())
        names = [n for n in tenancy.scopes if visible is None or n in visible]
        if visible is None and any(scope == "?" for scope, _ in st.index.usage):
            names.append("?")
        rows = []
        for name in names:
            scope = tenancy.scopes.get(name)
            tiers = {}
            for kind in TierKind:
                used, replicas = st.index.usage.get((name, kind), (0, 0))
                quota = scope.quotas.get(kind, 0) if scope is not None else 0
                if used or replicas or quota:
                    tiers[kind.value] = {"used": used, "replicas": replicas, "quota": quota or None}
            rows.append({"name": scope.label if scope is not None else "unknown",
                         "kind": tenancy.kinds.get(name, "unknown"),
                         "members": list(scope.members) if scope is not None else [],
                         "puts_open": self.core.puts.open_in(name),
                         "max_puts": (scope.max_puts or None) if scope is not None else None,
                         "tiers": tiers, "arena_share": tenancy.shares.get(name, 0.0),
                         "regions": self._regions(tenancy.region_of(name))})
        return web.json_response({"enabled": tenancy.enabled, "tenants": rows})

    def _regions(self, region: str) -> list[dict[str, object]]:
        """Where a scope's blocks live on each node's arenas (master.regions): offsets from
        the arena's base, and the bytes allocated there (all scopes of a common region)."""
        out: list[dict[str, object]] = []
        for node in self.core.state.nodes.values():
            for kind, space in node.tiers.items():
                if space.allocator is not None:
                    r = space.allocator.region(region)
                    out.append({"node": node.node_id, "tier": kind.value, "region": r.name or "common",
                                "offset": r.offset, "size": r.size, "address": space.address + r.offset,
                                "used": space.allocator.used_in(r.name)})
        return out

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})

    async def stats(self, request: web.Request) -> web.Response:
        raw = request.query.get("recent", "20")
        if not raw.isdigit() or int(raw) > RECENT_MAX:
            raise BadRequest(f"recent={raw!r:.20}: give a count of events in 0..{RECENT_MAX}")
        st = self.core.state
        counters = st.counters
        hub = st.events
        return web.json_response({
            "ts": time.time(), "role": self.core.role.value,
            "counters": {name: counters.get(name, 0) for name in STATS},
            "events": {"first_id": hub.first_id, "last_id": hub.last_id,
                       "subscribers": hub.subscribers,
                       "recent": [e.to_json() for e in hub.recent(int(raw))]}})

    async def purge(self, request: web.Request) -> web.Response:
        """Remove a namespace's, a model's or every block: ``{"namespaces": [root hex],
        "models": [id]}`` or ``{"all": true}``."""
        self.core.gate()
        try:
            body = await request.json() if request.can_read_body else {}
        except json.JSONDecodeError as exc:
            raise BadRequest(f"purge takes a JSON object: {exc}") from None
        if not isinstance(body, dict):
            raise BadRequest("purge takes a JSON object")
        unknown = set(body) - {"namespaces", "models", "all"}
        if unknown:
            raise BadRequest(f"purge has unknown fields: {', '.join(sorted(map(str, unknown)))}")
        everything = body.get("all", False)
        if not isinstance(everything, bool):
            raise BadRequest("all must be true or false")
        namespaces, models = body.get("namespaces", []), body.get("models", [])
        if not isinstance(namespaces, list) or not isinstance(models, list) \
                or not all(isinstance(m, str) and m for m in models):
            raise BadRequest("namespaces is a list of 32-hex namespace roots, models a list of "
                             "model ids")
        if everything == bool(namespaces or models):
            raise BadRequest("name namespaces or models to purge, or give all=true (not both)")
        roots = frozenset(parse_key(n) for n in namespaces)
        purged = await removal.purge(self.core.state, roots, frozenset(models), everything)
        return web.json_response({"purged": purged})
