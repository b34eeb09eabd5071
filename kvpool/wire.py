"""The RPC wire: msgpack frames over an aiohttp WebSocket, typed errors both ways.

Hot calls (reserve, commit, get, match) carry batches of raw 16-byte keys in one compact
binary body. Errors travel as ``{"error": code, "message": text}`` and come back out of
``RpcClient.call`` as the same typed exception. The WebSocket handshake carries the
protocol version both ways: a peer of another version is refused before any call, with
an error that names both versions.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import ssl
from typing import Any, Awaitable, Callable, Mapping

import aiohttp
import msgpack
from aiohttp import web

from kvpool import auth
from kvpool.auth import Credentials, Role
from kvpool.errors import (BadRequest, Forbidden, KVPoolError, MethodNotAllowed, NoRoute,
                           ProtocolMismatch, TooLarge, Unauthorized, Unavailable, error_from_code)

MAX_BODY = 64 << 20
# A call's frame above this is refused unhandled (TooLarge), before its body is decoded:
# decoding 64 MiB of keys holds the loop for most of a second. Only the methods a server
# names as bulk (a daemon's registration carries its whole inventory) may be larger.
MAX_CALL_FRAME = 4 << 20
CONNECTIONS = itertools.count(1)  # ids of RPC connections, both transports: a peer's limits
log = logging.getLogger(__name__)

# The RPC's version: raised whenever a record or call changes shape. Version 2 carries
# named records (kvpool.protocol, kvpool.daemon_link) where version 1 sent bare lists.
PROTOCOL_VERSION = 2
SUBPROTOCOL = f"kvpool.{PROTOCOL_VERSION}"  # the WebSocket subprotocol both ends must pick
PROTOCOL_HEADER = "KVPool-Protocol"  # a refusal names the server's version here


def _mismatch(theirs: str | None, url: str, side: str) -> ProtocolMismatch:
    return ProtocolMismatch(
        f"{side} speaks kvpool RPC protocol {PROTOCOL_VERSION} but {url} speaks "
        f"{theirs or 'an unversioned (older) protocol'}; run the same kvpool release on both "
        "ends (upgrade the older one)")


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=False)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError,
            TypeError) as exc:  # TypeError: a map keyed by an array or a map
        raise BadRequest(f"malformed or truncated msgpack body: {exc}") from None


def split_frame(data: bytes, bulk: frozenset[str]) -> tuple[Any, str, dict[str, Any] | KVPoolError]:
    """``[request id, method, body]`` out of a frame; the body is decoded only once the
    method is known to allow a frame of this size (else, in its place, the TooLarge to
    answer that request id with)."""
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=max(len(data), 1))
    try:
        unpacker.feed(data)
        if unpacker.read_array_header() != 3:
            raise ValueError("not an array of 3")
        rid, name = unpacker.unpack(), unpacker.unpack()
        if not isinstance(name, str):
            raise ValueError("the method is not a string")
        if len(data) > MAX_CALL_FRAME and name not in bulk:
            return rid, name, TooLarge(f"a {name!r} frame of {len(data)} bytes is over the "
                                       f"limit of {MAX_CALL_FRAME} bytes per call; split the batch")
        body = unpacker.unpack()
        if unpacker.tell() != len(data):
            raise ValueError(f"{len(data) - unpacker.tell()} bytes after the frame")
    except (msgpack.OutOfData, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            ValueError, TypeError) as exc:
        raise BadRequest(f"an RPC frame is [request id, method, body map]: {exc}") from None
    if not isinstance(body, dict):
        raise BadRequest("an RPC frame is [request id, method, body map]")
    return rid, name, body


Handler = Callable[[dict[str, Any]], Awaitable[Any]]


def refusal(exc: KVPoolError, **headers: str) -> web.Response:
    return web.json_response({"error": exc.code, "message": str(exc)}, status=exc.http_status,
                             headers=headers or None)


def rpc_endpoint(handlers: dict[str, Handler], credentials: Credentials = Credentials(),
                 roles: Mapping[str, frozenset[Role]] | None = None,
                 bulk: frozenset[str] = frozenset(),
                 connections: set[web.WebSocketResponse] | None = None,
                 ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """An aiohttp handler serving RPC over one WebSocket per peer.

    A frame is ``[request id, method, body]``; the answer is ``[request id, 0, result]``
    or ``[request id, 1, {error, message}]``. Each request runs as its own task, so a
    slow call never holds up the peer's other calls. A WebSocket round trip costs a
    quarter of an HTTP request here (0.16 ms against 0.56 ms).

    With ``credentials``, the handshake is refused (401, before the upgrade) unless it
    presents a known one; a method then runs only for the roles ``roles`` gives it (403
    otherwise; a method ``roles`` omits is refused to everyone), and its handler finds the
    connection's role in ``auth.current()`` for checks that depend on the body, and the
    connection's id in ``auth.peer()``. Only ``bulk`` methods may send frames over
    MAX_CALL_FRAME. Open connections are kept in ``connections``, for ``close_all`` at a
    stop (an idle peer would otherwise hold the server's shutdown).
    """
    allowed = dict(roles or {})

    async def serve(request: web.Request) -> web.StreamResponse:
        try:
            role, tenant = credentials.identify(request.headers.get(auth.AUTH_HEADER))
        except Unauthorized as exc:
            return refusal(exc)
        namespace = request.headers.get(auth.NAMESPACE_HEADER, "")[:64]
        offered = [p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",")]
        if SUBPROTOCOL not in offered:
            theirs = ", ".join(p.removeprefix("kvpool.") for p in offered if p.startswith("kvpool."))
            exc = _mismatch(theirs, f"the peer at {request.remote}", "this server")
            return refusal(exc, **{PROTOCOL_HEADER: str(PROTOCOL_VERSION)})
        ws = web.WebSocketResponse(max_msg_size=MAX_BODY, protocols=(SUBPROTOCOL,))
        await ws.prepare(request)
        guard = connection_guard(role, allowed)
        tasks: set[asyncio.Task[None]] = set()
        conn = next(CONNECTIONS)
        if connections is not None:
            connections.add(ws)
        try:
            await _serve_frames(ws, handlers, guard, (role, tenant, namespace), conn, bulk, tasks)
        finally:
            if connections is not None:
                connections.discard(ws)
            for task in tasks:
                task.cancel()
        return ws

    return serve


Guard = tuple[frozenset[str], Mapping[str, frozenset[Role]]]


def connection_guard(role: Role | None, allowed: Mapping[str, frozenset[Role]]) -> Guard | None:
    """What a connection of ``role`` may call, worked out once: a call then costs a set
    lookup (None: credentials are off, everything is open)."""
    if role is None:
        return None
    return frozenset(name for name, needed in allowed.items() if auth.allows(role, needed)), allowed


async def close_all(connections: set[web.WebSocketResponse]) -> None:
    """Close every open RPC connection (a server stopping); peers see the close at once."""
    async def close(ws: web.WebSocketResponse) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"server stopping")

    with contextlib.suppress(TimeoutError):  # a peer that does not answer the close is cut
        async with asyncio.timeout(2.0):
            await asyncio.gather(*(close(ws) for ws in list(connections)))


async def _serve_frames(ws: web.WebSocketResponse, handlers: dict[str, Handler],
                        guard: Guard | None, who: tuple[Role | None, str | None, str], conn: int,
                        bulk: frozenset[str], tasks: set[asyncio.Task[None]]) -> None:
    async for msg in ws:
        if msg.type == aiohttp.WSMsgType.BINARY:
            task = asyncio.get_running_loop().create_task(
                _answer(ws, msg.data, handlers, guard, who, conn, bulk))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        elif msg.type == aiohttp.WSMsgType.TEXT:
            await ws.send_bytes(pack([None, 1, {"error": BadRequest.code,
                                                "message": "RPC frames are binary msgpack"}]))


def _frame(frame: Any) -> tuple[Any, str, dict[str, Any]]:
    """``[request id, method, body map]`` out of a frame the stream transport decoded
    (its size was bounded as it arrived)."""
    if not (isinstance(frame, list) and len(frame) == 3 and isinstance(frame[1], str)
            and isinstance(frame[2], dict)):
        raise BadRequest("an RPC frame is [request id, method, body map]")
    return frame[0], frame[1], frame[2]


async def respond(data: Any, handlers: dict[str, Handler], guard: Guard | None,
                  role: Role | None, bulk: frozenset[str] = frozenset()) -> bytes:
    """The packed answer to one request frame (raw bytes, or a frame already unpacked):
    the handler's result, or its typed error. Both transports serve calls through this."""
    rid = None
    try:
        if isinstance(data, (bytes, bytearray, memoryview)):
            rid, name, body = split_frame(bytes(data), bulk)
            if isinstance(body, KVPoolError):
                raise body
        else:
            rid, name, body = _frame(data)
        handler = handlers.get(name)
        if handler is None:
            raise BadRequest(f"unknown RPC method {name!r}")
        if guard is not None and name not in guard[0]:
            needed = sorted(guard[1].get(name, frozenset()))
            if not needed:
                raise Forbidden(f"the RPC call {name!r} is open to no credential here")
            auth.require(*needed, role=role, what=f"the RPC call {name!r}")
        out = [rid, 0, await handler(body)]
    except KVPoolError as exc:
        out = [rid, 1, {"error": exc.code, "message": str(exc)}]
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # a bug: report it as such and keep serving
        log.exception("RPC handler failed")
        out = [rid, 1, {"error": KVPoolError.code, "message": f"internal error: {type(exc).__name__}: {exc}"}]
    return pack(out)


async def _answer(ws: web.WebSocketResponse, data: bytes, handlers: dict[str, Handler],
                  guard: Guard | None, who: tuple[Role | None, str | None, str], conn: int,
                  bulk: frozenset[str]) -> None:
    role, tenant, namespace = who
    # In this task's own context: the handler finds the caller's role, tenant and namespace.
    auth.enter(role, conn, tenant, namespace)
    out = await respond(data, handlers, guard, role, bulk)
    if not ws.closed:
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.send_bytes(out)


def settle(pending: dict[int, asyncio.Future[Any]], answer: Any) -> None:
    """Resolve the call an answer ``[request id, status, body]`` is for (both transports'
    clients): its result, or its typed error; an answer nobody waits for is dropped."""
    rid, status, body = answer
    fut = pending.pop(rid, None)
    if fut is None or fut.done():
        return
    if status == 0:
        fut.set_result(body)
    else:
        fut.set_exception(error_from_code(body.get("error", ""), body.get("message", "")))


_HTTP_ERRORS: dict[int, type[KVPoolError]] = {
    404: NoRoute, 405: MethodNotAllowed, 413: TooLarge, 401: Unauthorized, 403: Forbidden}


@web.middleware
async def error_middleware(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                           ) -> web.StreamResponse:
    """Every failure of a JSON endpoint becomes a typed error reply, aiohttp's own (no
    route, wrong method, body too large, not a WebSocket) included; the server keeps serving."""
    try:
        return await handler(request)
    except KVPoolError as exc:
        return web.json_response({"error": exc.code, "message": str(exc)}, status=exc.http_status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        typed = _HTTP_ERRORS.get(exc.status, BadRequest if exc.status < 500 else KVPoolError)
        headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
        text = exc.text or ""
        detail = exc.reason if not text or text.startswith(f"{exc.status}:") else text
        if headers:
            detail += f" (allowed: {headers.get('Allow') or next(iter(headers.values()))})"
        return web.json_response({"error": typed.code,
                                  "message": f"{request.method} {request.path}: {detail}"},
                                 status=exc.status, headers=headers or None)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return web.json_response({"error": KVPoolError.code,
                                  "message": f"internal error: {type(exc).__name__}: {exc}"}, status=500)


def auth_middleware(credentials: Credentials, open_paths: frozenset[str],
                    own_paths: frozenset[str], tenant_paths: frozenset[str] = frozenset()) -> Any:
    """HTTP endpoints' credential check: reads (GET) need the viewer role, everything else
    the admin role; ``open_paths`` need nothing, ``own_paths`` check for themselves (RPC).
    A tenant's viewer credential reads ``tenant_paths`` only (their handlers filter what
    it sees by ``auth.tenant()``). A read may carry the credential in the cookie
    ``kvpool_token`` instead, for a browser's EventSource, which cannot send headers (a
    cookie never authorizes a change: CSRF)."""

    @web.middleware
    async def check(request: web.Request,
                    handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        if credentials.enabled and request.path not in open_paths and request.path not in own_paths:
            reading = request.method in ("GET", "HEAD")
            header = request.headers.get(auth.AUTH_HEADER)
            if header is None and reading and auth.COOKIE in request.cookies:
                header = f"Bearer {request.cookies[auth.COOKIE]}"
            try:
                role, tenant = credentials.identify(header)
                auth.require(Role.VIEWER if reading else Role.ADMIN, role=role,
                             what=f"{request.method} {request.path}")
                if tenant is not None and request.path not in tenant_paths:
                    raise Forbidden(f"{request.method} {request.path} needs a viewer credential "
                                    f"of the whole pool; tenant {tenant!r}'s reads "
                                    f"{', '.join(sorted(tenant_paths))} only")
            except (Unauthorized, Forbidden) as exc:
                return refusal(exc)
            auth.enter(role, None, tenant)
        return await handler(request)

    return check


class RpcClient:
    """Calls on one server over a persistent WebSocket; errors come back typed."""

    def __init__(self, base_url: str, timeout_s: float = 10.0, path: str = "/v1/rpc",
                 token: str = "", tls: ssl.SSLContext | None = None, namespace: str = "") -> None:
        """``token``: the credential to present; ``tls``: what an https:// server's
        certificate is verified against (None: the system's CAs); ``namespace``: the
        shared namespace the connection's keys live in (empty: its tenant's own)."""
        self.base_url = base_url.rstrip("/")
        self._headers = auth.bearer(token)
        if namespace:
            self._headers[auth.NAMESPACE_HEADER] = namespace
        self._tls: ssl.SSLContext | bool = tls if tls is not None else True
        self.url = self.base_url + path
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._lock = asyncio.Lock()

    async def _connect(self) -> aiohttp.ClientWebSocketResponse:
        async with self._lock:
            if self._ws is not None and not self._ws.closed:
                return self._ws
            if self._session is None or self._session.closed:
                self._session = aiohttp.ClientSession()
            try:
                self._ws = await self._session.ws_connect(
                    self.url, max_msg_size=MAX_BODY, timeout=aiohttp.ClientWSTimeout(ws_close=2.0),
                    autoping=True, protocols=(SUBPROTOCOL,), headers=self._headers,
                    ssl=self._tls)
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status == Unauthorized.http_status:
                    raise Unauthorized(
                        f"{self.url} refused this caller's credential ("
                        f"{'a wrong one was presented' if self._headers else 'none was presented'}"
                        "); set the token it expects (clients: [client] token or "
                        "KVPOOL_CLIENT_TOKEN; daemons: [daemon] cluster_token)") from None
                theirs = exc.headers.get(PROTOCOL_HEADER) if exc.headers else None
                if exc.status == ProtocolMismatch.http_status or (theirs and theirs != str(PROTOCOL_VERSION)):
                    raise _mismatch(theirs, self.url, "this client") from None
                raise Unavailable(f"cannot open RPC to {self.url}: {exc}; is it a kvpool server?") from None
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                raise Unavailable(f"cannot reach {self.url}: {exc or type(exc).__name__}; "
                                  "is the server running?") from None
            if self._ws.protocol != SUBPROTOCOL:  # a server too old to check versions
                await self._ws.close()
                raise _mismatch(None, self.url, "this client")
            self._reader = asyncio.get_running_loop().create_task(self._read(self._ws))
            return self._ws

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    continue
                settle(self._pending, unpack(msg.data))
        finally:
            gone = Unavailable(f"connection to {self.url} closed; is the server running?")
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(gone)
            self._pending.clear()

    async def call(self, method: str, body: dict[str, Any] | None = None,
                   timeout_s: float | None = None) -> Any:
        ws = self._ws
        if ws is None or ws.closed:
            ws = await self._connect()
        rid = next(self._ids)
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await ws.send_bytes(pack([rid, method, body or {}]))
        except (ConnectionError, RuntimeError) as exc:
            self._pending.pop(rid, None)
            raise Unavailable(f"cannot send to {self.url}: {exc}") from None
        try:
            async with asyncio.timeout(timeout_s or self.timeout_s):
                return await fut
        except TimeoutError:
            self._pending.pop(rid, None)
            raise Unavailable(f"{self.url} did not answer {method} within "
                              f"{timeout_s or self.timeout_s:.1f}s") from None

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._reader is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._session is not None:
            await self._session.close()
        self._ws = self._reader = self._session = None
