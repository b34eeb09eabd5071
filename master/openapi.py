"""The OpenAPI document of the admin API (the msgpack RPC under /v1/rpc is internal)."""

from __future__ import annotations

from typing import Any


def _op(summary: str, mutating: bool = False, params: list[dict[str, Any]] | None = None,
        body: dict[str, Any] | None = None, public: bool = False) -> dict[str, Any]:
    """With credentials configured, a read needs the viewer (or admin) credential, a
    mutation the admin one; ``public`` operations need none."""
    op: dict[str, Any] = {"summary": summary, "responses": {
        "200": {"description": "OK", "content": {"application/json": {}}},
        "400": {"description": "Bad request: {error, message}"},
        "404": {"description": "Unknown block: {error, message}"}}}
    if not public:
        op["security"] = [{"bearer": []}]
        op["responses"]["401"] = {"description": "Missing or unknown credential (when configured)"}
        op["responses"]["403"] = {"description": "The credential's role may not: "
                                  + ("admin only" if mutating else "viewer or admin")}
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = {"content": {"application/json": {"schema": body}}}
    return op


_KEY = {"name": "key", "in": "path", "required": True,
        "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
        "description": "Block key, 32 hex characters"}

_NODE = {"name": "node", "in": "path", "required": True, "schema": {"type": "string"},
         "description": "Node id"}

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {"title": "kvpool master admin API", "version": "1"},
    "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    "paths": {
        "/v1/cluster": {"get": _op("Cluster summary: nodes, blocks, capacity and use per tier")},
        "/v1/nodes": {"get": _op("Nodes and their tiers' capacity, use and block counts")},
        "/v1/blocks/{key}": {
            "get": _op("One block: size, state, pins, leases, replicas", params=[_KEY]),
            "delete": _op("Remove a block (409 while leased or pinned unless force=true)", True,
                          [_KEY, {"name": "force", "in": "query", "schema": {"type": "boolean"}}])},
        "/v1/blocks/{key}/pin": {"post": _op("Pin a block: never demoted or evicted", True, [_KEY])},
        "/v1/blocks/{key}/unpin": {"post": _op("Release one pin", True, [_KEY])},
        "/v1/evict": {"post": _op("Demote the coldest movable blocks of a tier down to a fill level",
                                  True, body={"type": "object", "properties": {
                                      "tier": {"type": "string", "enum": ["gpu", "host", "ssd", "object"]},
                                      "fill": {"type": "number", "minimum": 0, "maximum": 1}}})},
        "/v1/nodes/{node}/drain": {
            "post": _op("Drain a node (202): it takes no new blocks, its blocks in every tier move "
                        "to other nodes or the shared object tier, readers' leases on it are waited "
                        "for; then its state is drained and can_stop true (410: no such node)", True,
                        [_NODE], {"type": "object", "additionalProperties": False, "properties": {
                            "timeout_s": {"type": "number", "exclusiveMinimum": 0,
                                          "maximum": 86400}}}),
            "get": _op("Where a node's drain stands: state (active, draining, drained, stuck), "
                       "moved, dropped, left, waiting_leases, note, can_stop", params=[_NODE]),
            "delete": _op("Stop draining: the node takes new blocks again", True, [_NODE])},
        "/v1/traces/{request_id}": {"get": _op(
            "The spans this master kept of one request's pool calls (a bounded ring of recent "
            "requests): where, step, who called, start, duration, detail, error", params=[
                {"name": "request_id", "in": "path", "required": True,
                 "schema": {"type": "string", "pattern": "^[A-Za-z0-9._:@/+=-]{1,128}$"}}])},
        "/v1/events": {"get": _op(
            "KV events as server-sent events, in vLLM's schema (BlockStored, BlockRemoved, "
            "AllBlocksCleared; block_hashes as 32-hex keys, parent_block_hash, block_size, "
            "medium gpu/host/ssd/object, token_ids when the writer sent them, node, reason). Each "
            "has an increasing id; resume after one with Last-Event-ID (or last_event_id=, 0 for "
            "everything kept). A subscriber that fell behind gets EventsLost with the count missed.",
            params=[{"name": "Last-Event-ID", "in": "header", "schema": {"type": "integer", "minimum": 0}},
                    {"name": "last_event_id", "in": "query", "schema": {"type": "integer", "minimum": 0}}])},
        "/v1/stats": {"get": _op("Activity counters and the latest events (the status page and "
                                 "`kvpool top` poll it)", params=[
            {"name": "recent", "in": "query", "schema": {"type": "integer", "minimum": 0, "maximum": 500}}])},
        "/v1/purge": {"post": _op("Remove every block of some namespaces or models, or of the whole pool "
                                  "(then one AllBlocksCleared event)", True, body={
            "type": "object", "additionalProperties": False, "properties": {
                "namespaces": {"type": "array", "items": {"type": "string", "pattern": "^[0-9a-f]{32}$"}},
                "models": {"type": "array", "items": {"type": "string", "minLength": 1}},
                "all": {"type": "boolean"}}})},
        "/": {"get": _op("The status page (HTML; its data comes from the viewer endpoints)", public=True)},
        "/metrics": {"get": _op("Prometheus text metrics")},
        "/healthz": {"get": _op("Liveness", public=True)},
        "/readyz": {"get": _op("Readiness: 503 on a standby master, and on a new leader until it has "
                              "rebuilt its index from the daemons' inventories", public=True)},
        "/openapi.json": {"get": _op("This document")},
    },
}
