"""The OpenAPI document of the admin API (the msgpack RPC under /v1/rpc is internal).

Every operation names its response's schema and every error it can answer with: an
error is ``{"error": code, "message": text}``, its status and codes taken from the error
classes themselves (kvpool.errors), so a new error class or status cannot be left out of
the document. The tests run schemathesis against a live master with this document: no
server error, no response outside its schema.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Sequence

from kvpool.errors import (BadRequest, BlockLeased, BlockNotFound, Forbidden, KVPoolError,
                           NodeNotFound, NotLeader, NotReady, Unauthorized, all_codes)

Schema = dict[str, Any]
ErrorClass = type[KVPoolError]


def _obj(required: bool = True, **props: Schema) -> Schema:
    """An object with exactly these properties (all required unless ``required`` is False)."""
    out: Schema = {"type": "object", "properties": props, "additionalProperties": False}
    if required and props:
        out["required"] = sorted(props)
    return out


def _array(items: Schema) -> Schema:
    return {"type": "array", "items": items}


_INT = {"type": "integer"}
_NUM = {"type": "number"}
_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_HEX = {"type": "string", "pattern": "^[0-9a-f]{32}$"}
_TIER = {"type": "string", "enum": ["gpu", "host", "ssd", "object"]}


def _nullable(schema: Schema) -> Schema:
    return {**schema, "nullable": True}


_EVENT: Schema = {"type": "object", "required": ["id", "ts", "type"], "properties": {
    "id": _INT, "ts": _NUM,
    "type": {"type": "string", "enum": ["BlockStored", "BlockRemoved", "AllBlocksCleared"]},
    "block_hashes": _array(_HEX), "medium": _nullable(_TIER), "node": _nullable(_STR),
    "parent_block_hash": _nullable(_HEX), "block_size": _nullable(_INT), "lora_id": _nullable(_INT),
    "token_ids": _array(_INT), "reason": _STR, "namespace": _STR, "request_id": _STR,
    "scope": _STR}}
_NODE_STATE = dict(
    state={"type": "string", "enum": ["active", "draining", "drained", "stuck"]}, can_stop=_BOOL,
    moved=_INT, dropped=_INT, left=_INT, waiting_leases=_INT, note=_STR,
    started=_nullable(_NUM), finished=_nullable(_NUM))
_TIER_ROW = _obj(kind=_TIER, capacity=_INT, used=_INT, blocks=_INT, compression=_NUM,
                 high_watermark=_NUM, low_watermark=_NUM, fragmentation=_nullable(_NUM),
                 shared_store=_nullable(_STR))
_SPAN = _obj(request_id=_STR, where=_STR, name=_STR, start=_NUM, duration_ms=_NUM, by=_STR,
             detail=_STR, error=_STR)

RESPONSES: dict[str, Schema] = {
    "Cluster": _obj(cluster=_STR, ready=_BOOL, leader=_BOOL, nodes=_INT, blocks=_INT, pending=_INT,
                    tiers={"type": "object", "additionalProperties": _obj(
                        capacity=_INT, used=_INT, blocks=_INT, compression=_NUM)}),
    "Nodes": _obj(nodes=_array(_obj(node_id=_STR, url=_STR, agent=_STR, tiers=_array(_TIER_ROW),
                                    **_NODE_STATE))),
    "Block": _obj(key=_HEX, size=_INT, state={"type": "string", "enum": ["complete", "moving"]},
                  pins=_INT, leases=_INT, parent=_nullable(_HEX), soft_pinned=_BOOL,
                  replicas=_array(_obj(node=_STR, tier=_TIER, location=_INT, size=_INT,
                                       node_state=_STR))),
    "Drain": _obj(node_id=_STR, **_NODE_STATE),
    "Trace": _obj(request_id=_STR, where=_STR, spans=_array(_SPAN)),
    "Stats": _obj(ts=_NUM, role={"type": "string", "enum": ["leader", "rebuilding", "standby"]},
                  counters={"type": "object", "additionalProperties": _INT},
                  events=_obj(first_id=_INT, last_id=_INT, subscribers=_INT, recent=_array(_EVENT))),
    "Ready": _obj(ready=_BOOL, leader=_BOOL, leader_url=_STR, nodes=_INT),
    "Tenants": _obj(enabled=_BOOL, tenants=_array(_obj(
        name=_STR, kind={"type": "string", "enum": ["default", "tenant", "shared", "unknown"]},
        members=_array(_STR), puts_open=_INT, max_puts=_nullable(_INT),
        tiers={"type": "object", "additionalProperties": _obj(
            used=_INT, replicas=_INT, quota=_nullable(_INT))},
        arena_share=_NUM, regions=_array(_obj(
            node=_STR, tier=_TIER, region=_STR, offset=_INT, size=_INT, address=_INT,
            used=_INT))))),
}


def _error_responses(errors: Sequence[ErrorClass]) -> dict[str, Schema]:
    """One response per status the errors map to, each listing exactly their codes."""
    by_status: dict[int, list[ErrorClass]] = defaultdict(list)
    for cls in errors:
        by_status[cls.http_status].append(cls)
    out = {}
    for status, classes in sorted(by_status.items()):
        codes = sorted({c.code for c in classes})
        out[str(status)] = {
            "description": "; ".join(f"{c.code}: {(c.__doc__ or c.__name__).strip()}" for c in classes),
            "content": {"application/json": {"schema": {
                "allOf": [{"$ref": "#/components/schemas/Error"}],
                "properties": {"error": {"type": "string", "enum": codes}}}}}}
    return out


def _op(summary: str, ok: Schema | str | None, *, mutating: bool = False,
        errors: Sequence[ErrorClass] = (), params: list[Schema] | None = None,
        body: Schema | None = None, body_required: bool = False, public: bool = False,
        status: int = 200, media: str = "application/json") -> Schema:
    """An operation. With credentials configured a read needs the viewer (or admin)
    credential and a change the admin one (401, 403); ``public`` ones need none. A change
    is served by the leader only (421 on a standby, 503 while a new leader rebuilds)."""
    errs = list(errors)
    if params or body:
        errs.append(BadRequest)
    if not public:
        errs += [Unauthorized, Forbidden]
    if mutating:
        errs += [NotLeader, NotReady]
    content: Schema = {media: {"schema": RESPONSES[ok] if isinstance(ok, str) else (ok or {})}}
    op: Schema = {"summary": summary, "responses": {
        str(status): {"description": "OK", "content": content}, **_error_responses(errs)}}
    if not public:
        op["security"] = [{"bearer": []}]
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = {"required": body_required,
                             "content": {"application/json": {"schema": body}}}
    return op


def _path(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": schema, "description": description}


_KEY = _path("key", _HEX, "Block key, 32 hex characters")
_SCOPE = {"name": "scope", "in": "query",
          "schema": {"type": "string", "pattern": "^([A-Za-z0-9][A-Za-z0-9_.-]{0,63})?$"},
          "description": "The tenant or shared namespace whose key this is, as the events show it "
                         "(empty or absent: the key as the index has it)"}
_NODE = _path("node", {"type": "string", "pattern": "^[^/{}]+$"}, "Node id")
_REQUEST = _path("request_id", {"type": "string", "pattern": "^[A-Za-z0-9._:@=+-]{1,128}$"},
                 "A request id, or a traceparent's 32-hex trace id")
_TEXT = {"type": "string"}
_MODELS = _array({"type": "string", "minLength": 1})
# Either the whole pool (all: true, nothing named) or some namespaces or models (at least one).
_PURGE: Schema = {"oneOf": [
    _obj(False, all={"type": "boolean", "enum": [True]}, namespaces={**_array(_HEX), "maxItems": 0},
         models={**_MODELS, "maxItems": 0}) | {"required": ["all"]},
    _obj(False, all={"type": "boolean", "enum": [False]}, namespaces=_array(_HEX), models=_MODELS)
    | {"anyOf": [{"required": ["namespaces"], "properties": {"namespaces": {"minItems": 1}}},
                 {"required": ["models"], "properties": {"models": {"minItems": 1}}}]}]}

OPENAPI: Schema = {
    "openapi": "3.0.3",
    "info": {"title": "kvpool master admin API", "version": "1"},
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {"Error": {
            "type": "object", "required": ["error", "message"], "additionalProperties": False,
            "properties": {"error": {"type": "string", "enum": all_codes()},
                           "message": _STR}}}},
    "paths": {
        "/v1/cluster": {"get": _op("Cluster summary: nodes, blocks, capacity and use per tier", "Cluster")},
        "/v1/nodes": {"get": _op("Nodes, their drain state and their tiers' capacity, use and "
                                 "block counts", "Nodes")},
        "/v1/blocks/{key}": {
            "get": _op("One block: size, state, pins, leases, parent, replicas", "Block",
                       errors=[BlockNotFound], params=[_KEY, _SCOPE]),
            "delete": _op("Remove a block (409 while leased or pinned unless force=true)",
                          _obj(removed=_BOOL), mutating=True, errors=[BlockNotFound, BlockLeased],
                          params=[_KEY, _SCOPE, {"name": "force", "in": "query", "schema": _BOOL}])},
        "/v1/blocks/{key}/pin": {"post": _op("Pin a block: never demoted or evicted",
                                             _obj(pinned=_BOOL), mutating=True,
                                             errors=[BlockNotFound], params=[_KEY, _SCOPE])},
        "/v1/blocks/{key}/unpin": {"post": _op("Release one pin", _obj(pinned=_BOOL), mutating=True,
                                               errors=[BlockNotFound], params=[_KEY, _SCOPE])},
        "/v1/evict": {"post": _op("Demote the coldest movable blocks of a tier down to a fill level",
                                  _obj(freed_bytes=_INT), mutating=True,
                                  body=_obj(False, tier=_TIER,
                                            fill={"type": "number", "minimum": 0, "maximum": 1}))},
        "/v1/nodes/{node}/drain": {
            "post": _op("Drain a node (202): it takes no new blocks, its blocks in every tier move "
                        "to other nodes or the shared object tier, readers' leases on it are waited "
                        "for; then its state is drained and can_stop true", "Drain", mutating=True,
                        errors=[NodeNotFound], params=[_NODE], status=202,
                        body=_obj(False, timeout_s={"type": "number", "exclusiveMinimum": True,
                                                    "minimum": 0, "maximum": 86400})),
            "get": _op("Where a node's drain stands", "Drain", errors=[NodeNotFound], params=[_NODE]),
            "delete": _op("Stop draining: the node takes new blocks again", "Drain", mutating=True,
                          errors=[NodeNotFound], params=[_NODE])},
        "/v1/traces/{request_id}": {"get": _op(
            "The spans this master kept of one request's pool calls (a bounded ring of recent "
            "requests)", "Trace", params=[_REQUEST])},
        "/v1/events": {"get": _op(
            "KV events as server-sent events, in vLLM's schema (BlockStored, BlockRemoved, "
            "AllBlocksCleared; block_hashes as 32-hex keys, parent_block_hash, block_size, "
            "medium gpu/host/ssd/object, token_ids when the writer sent them, node, reason, "
            "request_id). Each has an increasing id; resume after one with Last-Event-ID (or "
            "last_event_id=, 0 for everything kept). A subscriber that fell behind gets "
            "EventsLost with the count missed.", _TEXT, media="text/event-stream",
            params=[{"name": "Last-Event-ID", "in": "header", "schema": {"type": "integer", "minimum": 0}},
                    {"name": "last_event_id", "in": "query", "schema": {"type": "integer", "minimum": 0}}])},
        "/v1/stats": {"get": _op("Activity counters and the latest events (the status page and "
                                 "`kvpool top` poll it)", "Stats", params=[
            {"name": "recent", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": 500}}])},
        "/v1/tenants": {"get": _op("Per tenant, shared namespace and the default scope: bytes and "
                                   "replicas held per tier against its quota, puts in flight "
                                   "against its max_puts (a tenant's viewer sees its own rows)",
                                   "Tenants")},
        "/v1/purge": {"post": _op("Remove every block of some namespaces or models, or of the whole "
                                  "pool (then one AllBlocksCleared event)", _obj(purged=_INT),
                                  mutating=True, body=_PURGE, body_required=True)},
        "/": {"get": _op("The status page (HTML; its data comes from the viewer endpoints)", _TEXT,
                         public=True, media="text/html")},
        "/metrics": {"get": _op("Prometheus text metrics", _TEXT, media="text/plain")},
        "/healthz": {"get": _op("Liveness", _obj(ok=_BOOL), public=True)},
        "/readyz": {"get": {**_op("Readiness", "Ready", public=True), "responses": {
            "200": {"description": "A ready leader",
                    "content": {"application/json": {"schema": RESPONSES["Ready"]}}},
            "503": {"description": "A standby, or a new leader still rebuilding its index from "
                                   "the daemons' inventories",
                    "content": {"application/json": {"schema": RESPONSES["Ready"]}}}}}},
        "/openapi.json": {"get": _op("This document", {"type": "object"})},
    },
}
