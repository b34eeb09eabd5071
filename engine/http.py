"""What the engines' and the router's HTTP servers share: JSON bodies in, NDJSON lines and
typed errors out, and serving an app until a signal. Its own module, so that the engine
servers (serve.py) and the router both use it without importing each other."""

from __future__ import annotations

import asyncio
import json
import signal
from typing import Any

from aiohttp import web

from kvpool.errors import BadRequest, KVPoolError

NDJSON = "application/x-ndjson"


def error_response(exc: KVPoolError) -> web.Response:
    """The error as JSON with its code, under the HTTP status of its class."""
    return web.json_response({"error": exc.code, "message": str(exc)}, status=exc.http_status)


async def read_json(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest("the body must be a JSON object") from None
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object")
    return body


def line(obj: dict[str, Any]) -> bytes:
    """One NDJSON line."""
    return json.dumps(obj).encode() + b"\n"


async def serve(app: web.Application, host: str, port: int, announce: dict[str, Any]) -> None:
    """Serve ``app`` until SIGINT or SIGTERM, after printing one JSON line with its URL."""
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    print(json.dumps({**announce, "url": f"http://{host}:{port}"}), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
