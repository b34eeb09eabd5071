"""``GET /v1/events``: KV events as server-sent events (the master's, for the pool's
blocks; an engine's, for its own pages), and the subscriber a router follows them with.

Each event has an ``id:``; a subscriber resumes after the last one it saw with the
``Last-Event-ID`` header (what a browser's EventSource sends on its own when it
reconnects) or the ``last_event_id`` query parameter (``0``: everything the ring still
holds). Without either it starts at the next event. A subscriber that fell behind the
ring gets an ``EventsLost`` event saying how many it missed, then continues.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator

import aiohttp
from aiohttp import web

from kvpool.errors import BadRequest
from kvpool.kv_events import EventHub

log = logging.getLogger(__name__)
KEEPALIVE_S = 15.0  # a comment line when idle, so proxies keep the connection
WRITE_DEADLINE_S = 30.0  # a reader that takes no bytes for this long is cut off
BATCH = 1024  # events per write


def _resume_from(request: web.Request, hub: EventHub) -> int:
    raw = request.headers.get("Last-Event-ID") or request.query.get("last_event_id")
    if raw is None or raw == "":
        return hub.last_id
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"Last-Event-ID {raw!r:.40} is not an event id (an integer)") from None
    if value < 0:
        raise BadRequest(f"Last-Event-ID {value} is negative")
    return value


def end_on_shutdown(app: web.Application, hub: EventHub) -> None:
    """Streams end when the server shuts down, instead of holding its stop until the
    shutdown timeout."""

    async def close(_: web.Application) -> None:
        hub.close()

    app.on_shutdown.append(close)


async def stream(request: web.Request, hub: EventHub,
                 scopes: frozenset[str] | None = None) -> web.StreamResponse:
    """``scopes``: only events of these scopes (and those of no block, such as a clear)
    go to this reader; None: every event."""
    after = _resume_from(request, hub)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await resp.prepare(request)
    hub.subscribers += 1

    async def write(data: bytes) -> None:
        await asyncio.wait_for(resp.write(data), WRITE_DEADLINE_S)

    try:
        await write(b"retry: 1000\n\n")
        idle = 0.0
        while not hub.closed and request.transport is not None and not request.transport.is_closing():
            gap, events = hub.since(after, BATCH)
            if gap is not None:
                await write(gap.sse())
                after = gap.resume - 1
            if events:
                shown = events if scopes is None else [
                    e for e in events if e.scope in scopes or not e.block_hashes]
                if shown:
                    await write(b"".join(e.sse() for e in shown))
                after = events[-1].id
                idle = 0.0
                continue
            # Wake at least every second, so a reader that left is noticed promptly.
            if not await hub.wait(after, 1.0):
                idle += 1.0
                if idle >= KEEPALIVE_S:
                    await write(b": keepalive\n\n")
                    idle = 0.0
    except (ConnectionResetError, asyncio.TimeoutError, asyncio.CancelledError):
        pass
    finally:
        hub.subscribers -= 1
    return resp


READ_TIMEOUT_S = 40.0  # the server writes a keepalive every 15 s: silence past this is a dead link
RECONNECT_S = (0.5, 1.0, 2.0, 5.0)


async def subscribe(session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None,
                    last: int | None = None) -> AsyncIterator[dict[str, Any]]:
    """Every event of ``url``'s stream, decoded, forever: reconnects after a drop (backing
    off) and resumes from the last id seen, so nothing is missed that the ring still holds;
    what it no longer holds arrives as an ``EventsLost`` event."""
    failures = 0
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=READ_TIMEOUT_S)
    while True:
        hdrs = dict(headers or {})
        if last is not None:
            hdrs["Last-Event-ID"] = str(last)
        try:
            async with session.get(url, headers=hdrs, timeout=timeout) as resp:
                if resp.status != 200:
                    raise aiohttp.ClientResponseError(resp.request_info, (), status=resp.status,
                                                      message=(await resp.text())[:200])
                failures = 0
                data: list[str] = []
                async for raw in resp.content:
                    line = raw.decode().rstrip("\r\n")
                    if line.startswith("id:"):
                        last = int(line[3:].strip())
                    elif line.startswith("data:"):
                        data.append(line[5:].strip())
                    elif not line and data:
                        text, data = "\n".join(data), []
                        yield json.loads(text)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            wait = RECONNECT_S[min(failures, len(RECONNECT_S) - 1)]
            failures += 1
            log.debug("event stream %s dropped (%s); reconnecting in %.1fs", url, exc, wait)
            await asyncio.sleep(wait)
