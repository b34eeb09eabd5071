"""``GET /v1/events``: the master's KV events as server-sent events.

Each event has an ``id:``; a subscriber resumes after the last one it saw with the
``Last-Event-ID`` header (what a browser's EventSource sends on its own when it
reconnects) or the ``last_event_id`` query parameter (``0``: everything the ring still
holds). Without either it starts at the next event. A subscriber that fell behind the
ring gets an ``EventsLost`` event saying how many it missed, then continues.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from kvpool.errors import BadRequest
from master.events import EventHub

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


async def stream(request: web.Request, hub: EventHub) -> web.StreamResponse:
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
        while request.transport is not None and not request.transport.is_closing():
            gap, events = hub.since(after, BATCH)
            if gap is not None:
                await write(gap.sse())
                after = gap.resume - 1
            if events:
                await write(b"".join(e.sse() for e in events))
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
