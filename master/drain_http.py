"""The admin API of drains: ``POST /v1/nodes/{node}/drain`` starts (or resumes) one,
``DELETE`` of it stops it, ``GET`` says where it stands; ``/v1/nodes`` shows every node's
state beside its tiers."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from kvpool.errors import BadRequest
from master.nodes import Node

if TYPE_CHECKING:
    from master.core import MasterCore

DEFAULT_TIMEOUT_S = 300.0


def node_state(node: Node) -> dict[str, Any]:
    """A node's drain state as the API shows it (``can_stop``: nothing is lost by stopping it)."""
    d = node.drain
    return {"state": node.state.value, "can_stop": node.state.value == "drained",
            "moved": d.moved, "dropped": d.dropped, "left": d.left,
            "waiting_leases": d.waiting_leases, "note": d.note,
            "started": d.started or None, "finished": d.finished or None}


class DrainRoutes:
    def __init__(self, core: "MasterCore") -> None:
        self.core = core

    def add(self, app: web.Application) -> None:
        app.router.add_post("/v1/nodes/{node}/drain", self.start)
        app.router.add_delete("/v1/nodes/{node}/drain", self.stop)
        app.router.add_get("/v1/nodes/{node}/drain", self.show)

    async def start(self, request: web.Request) -> web.Response:
        """Body (optional): ``{"timeout_s": seconds}``, the drain's deadline."""
        self.core.gate()
        try:
            body = await request.json() if request.can_read_body else {}
        except json.JSONDecodeError as exc:
            raise BadRequest(f"drain takes a JSON object: {exc}") from None
        if not isinstance(body, dict) or set(body) - {"timeout_s"}:
            raise BadRequest("drain takes {\"timeout_s\": seconds} or nothing")
        timeout = body.get("timeout_s", DEFAULT_TIMEOUT_S)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise BadRequest("timeout_s is a number of seconds")
        node = self.core.drains.start(request.match_info["node"], float(timeout))
        return web.json_response({"node_id": node.node_id, **node_state(node)}, status=202)

    async def stop(self, request: web.Request) -> web.Response:
        self.core.gate()
        node = await self.core.drains.undrain(request.match_info["node"])
        return web.json_response({"node_id": node.node_id, **node_state(node)})

    async def show(self, request: web.Request) -> web.Response:
        node = self.core.drains.node(request.match_info["node"])
        return web.json_response({"node_id": node.node_id, **node_state(node)})
