"""The hot RPC's stream transport: msgpack frames back to back on one TCP (or TLS) connection.

Why a second transport: through aiohttp's WebSocket a call costs about 0.3 ms of Python
on both ends (frame masking, a task per message, an awaited send), five times a bare
socket ping-pong here. This one is an asyncio Protocol: msgpack's streaming unpacker cuts
the frames out of whatever bytes arrive (no length prefix to slice, no copy per frame),
a request whose handler never waits is answered inside ``data_received`` without a task,
and an answer is one ``transport.write``. Many calls may be in flight on one connection;
answers carry the request id, in any order.

The first frame each way is the hello. The client sends ``{"kvpool": version, "token":
credential}`` (and ``"namespace": name`` to use one of its tenant's shared namespaces);
the server checks the credential (constant time, once per connection) and
the version, then answers ``{"kvpool": version}``, or ``{"kvpool": version, "error":
code, "message": text}`` and hangs up. After it, frames are the WebSocket RPC's:
``[request id, method, body]`` answered by ``[request id, 0, result]`` or ``[request
id, 1, {error, message}]``, dispatched by the same code (kvpool.wire.respond).

A client finds the port with ``GET <path>/stream`` on the server's HTTP port (open, no
credential: it names a port, nothing more); TLS is on when that URL is https.

Without TLS the server also listens on a Unix socket in Linux's abstract namespace, under a
name drawn at random when it starts and given out with the port. A client on the same
host (and in the same network namespace, which scopes such names) connects there: the
same frames and hello, without the loopback TCP stack (a plain ping-pong does 1.3-1.8
times the round trips over it that it does over loopback TCP here). From anywhere else the name reaches nothing and the client takes TCP. The name is
not a secret (the hello still wants the credential); it only has to be unique, so that a
client never lands on another server.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import logging
import secrets
import socket
import ssl
import types
from typing import Any, Generator, Mapping
from urllib.parse import urlsplit

import aiohttp
import msgpack
from aiohttp import web

from kvpool import auth
from kvpool.auth import Credentials, Role
from kvpool.errors import (BadRequest, KVPoolError, ProtocolMismatch, TooLarge, Unauthorized,
                           Unavailable, error_from_code)
from kvpool.wire import (CONNECTIONS, MAX_BODY, MAX_CALL_FRAME, PROTOCOL_VERSION, Handler,
                         connection_guard, respond, settle)

log = logging.getLogger(__name__)
HELLO_TIMEOUT_S = 10.0  # a peer that says nothing this long after connecting is dropped
SOCKETS = ("auto", "tcp", "unix")  # a client's choice: the local socket where it can, TCP, or it


def _packer() -> msgpack.Packer:
    return msgpack.Packer(use_bin_type=True)


def _unpacker(limit: int = MAX_BODY) -> msgpack.Unpacker:
    return msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=limit)


@types.coroutine
def _resume(coro: Any, waiting: Any) -> Generator[Any, Any, Any]:
    """Carry on a coroutine that was started by hand and is now waiting on ``waiting``:
    what a Task does, for a coroutine whose first step already ran (eager start)."""
    while True:
        try:
            sent = yield waiting
        except BaseException as exc:  # noqa: BLE001 - cancellation too: hand it on
            try:
                waiting = coro.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                waiting = coro.send(sent)
            except StopIteration as done:
                return done.value


# -- server -------------------------------------------------------------------------------

class StreamRpcServer:
    """Serves ``handlers`` on a port of its own, with the same credential and role checks
    as the WebSocket endpoint (kvpool.wire.rpc_endpoint)."""

    def __init__(self, handlers: dict[str, Handler], credentials: Credentials = Credentials(),
                 roles: Mapping[str, frozenset[Role]] | None = None,
                 tls: ssl.SSLContext | None = None, eager: frozenset[str] = frozenset(),
                 max_frame: int = MAX_CALL_FRAME) -> None:
        """``eager``: the calls whose handlers may start outside a task (before their first
        wait they enter no ``asyncio.timeout`` and ask for no current task): a call that
        never waits then costs no task at all. ``max_frame``: a larger frame is refused
        (and the connection closed) before it is decoded, so one call cannot hold the loop."""
        self.handlers = handlers
        self.eager = eager
        self.max_frame = max_frame
        self.credentials = credentials
        self.roles = dict(roles or {})
        self.tls = tls
        self.port = 0
        self.local = ""  # the abstract Unix socket's name (without its leading NUL); "": none
        self._server: asyncio.AbstractServer | None = None
        self._local: asyncio.AbstractServer | None = None
        self._conns: set[_ServerConn] = set()

    async def start(self, host: str, port: int = 0) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _ServerConn(self), host, port,
                                                ssl=self.tls, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]
        if self.tls is None:
            await self._listen_locally()
        return self.port

    async def _listen_locally(self) -> None:
        name = f"kvpool-rpc-{secrets.token_hex(12)}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind("\0" + name)
            sock.listen(1024)
            sock.setblocking(False)
            self._local = await asyncio.get_running_loop().create_unix_server(
                lambda: _ServerConn(self), sock=sock)
        except OSError as exc:  # no abstract namespace (not Linux): TCP only
            sock.close()
            log.info("no local socket for the stream RPC (%s); clients use TCP", exc)
            return
        self.local = name

    def info(self) -> Any:
        """An aiohttp handler for ``GET <path>/stream``: where this server listens."""

        async def where(request: web.Request) -> web.Response:
            return web.json_response({"port": self.port, "protocol": PROTOCOL_VERSION,
                                      "tls": self.tls is not None, "local": self.local})

        return where

    async def close(self) -> None:
        servers = [s for s in (self._server, self._local) if s is not None]
        for server in servers:
            server.close()
        for conn in list(self._conns):
            conn.abort()
        for server in servers:
            await server.wait_closed()
        self._server = self._local = None
        self.local = ""


class _ServerConn(asyncio.Protocol):
    def __init__(self, server: StreamRpcServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.unpacker = _unpacker(server.max_frame)
        self.packer = _packer()
        self.hello_done = False
        self.role: Role | None = None
        self.guard: Any = None
        self.context = contextvars.copy_context()  # the connection's own: its role lives here
        self.tasks: set[asyncio.Task[bytes]] = set()
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server._conns.add(self)
        self.timer = asyncio.get_running_loop().call_later(HELLO_TIMEOUT_S, self.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._conns.discard(self)
        if self.timer is not None:
            self.timer.cancel()
        for task in self.tasks:
            task.cancel()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        try:
            self.unpacker.feed(data)
            for frame in self.unpacker:
                if self.hello_done:
                    self.dispatch(frame)
                else:
                    self.hello(frame)
        except msgpack.BufferFull:
            self.refuse(TooLarge(f"a frame over {self.server.max_frame} bytes on the kvpool RPC "
                                 "stream; split the batch"))
        except (msgpack.FormatError, msgpack.StackError, ValueError, TypeError) as exc:
            # TypeError: a map keyed by an array or a map, which Python cannot hold
            self.refuse(BadRequest(f"malformed or oversized frame on the kvpool RPC stream: {exc}"))

    def refuse(self, exc: KVPoolError) -> None:
        """Say why, then hang up."""
        assert self.transport is not None
        if not self.transport.is_closing():
            self.transport.write(self.packer.pack({"kvpool": PROTOCOL_VERSION, "error": exc.code,
                                                   "message": str(exc)}))
            self.transport.close()

    def hello(self, frame: Any) -> None:
        assert self.transport is not None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if not isinstance(frame, dict) or "kvpool" not in frame:
            return self.refuse(BadRequest("this port speaks the kvpool stream RPC; a connection "
                                          "starts with its hello"))
        if frame["kvpool"] != PROTOCOL_VERSION:
            return self.refuse(ProtocolMismatch(
                f"this server speaks kvpool RPC protocol {PROTOCOL_VERSION} but the peer at "
                f"{self.transport.get_extra_info('peername')} speaks {frame['kvpool']!r}; run "
                "the same kvpool release on both ends (upgrade the older one)"))
        token = frame.get("token") or ""
        namespace = frame.get("namespace") or ""
        if not isinstance(namespace, str) or len(namespace) > 64:
            return self.refuse(BadRequest("the hello's namespace is a name of at most 64 characters"))
        try:
            self.role, tenant = self.server.credentials.identify(
                f"Bearer {token}" if isinstance(token, str) and token else None)
        except Unauthorized as exc:
            return self.refuse(exc)
        self.guard = connection_guard(self.role, self.server.roles)
        self.context.run(auth.enter, self.role, next(CONNECTIONS), tenant, namespace)
        self.hello_done = True
        self.transport.write(self.packer.pack({"kvpool": PROTOCOL_VERSION}))

    def dispatch(self, frame: Any) -> None:
        """An eager call runs its first step right here, and only if it then waits does it
        get a task; any other call runs as a task of its own from the start."""
        coro = respond(frame, self.server.handlers, self.guard, self.role)
        if not (isinstance(frame, list) and len(frame) == 3 and frame[1] in self.server.eager):
            task = asyncio.get_running_loop().create_task(coro, context=self.context)
            self.tasks.add(task)
            task.add_done_callback(self.finished)
            return
        try:
            waiting = self.context.run(coro.send, None)
        except StopIteration as done:
            self.transport.write(done.value)  # type: ignore[union-attr]
            return
        task = asyncio.get_running_loop().create_task(_resume(coro, waiting), context=self.context)
        self.tasks.add(task)
        task.add_done_callback(self.finished)

    def finished(self, task: asyncio.Task[bytes]) -> None:
        self.tasks.discard(task)
        if task.cancelled() or self.transport is None or self.transport.is_closing():
            return
        exc = task.exception()
        if exc is not None:  # respond() turns every error into an answer; this is a bug
            log.error("stream RPC dispatch failed", exc_info=exc)
            return
        self.transport.write(task.result())


# -- client -------------------------------------------------------------------------------

class StreamRpcClient:
    """Calls on one server over a persistent stream connection; errors come back typed.
    The same face as kvpool.wire.RpcClient: ``call`` and ``close``. ``socket``: "auto" (the
    server's local socket where this host reaches it, else TCP), "tcp", or "unix" (an
    error where there is none to reach)."""

    def __init__(self, base_url: str, timeout_s: float = 10.0, path: str = "/v1/rpc",
                 token: str = "", tls: ssl.SSLContext | None = None, namespace: str = "",
                 socket: str = "auto") -> None:
        if socket not in SOCKETS:
            raise ValueError(f"socket = {socket!r}: give one of {', '.join(SOCKETS)}")
        self.socket = socket
        self.over = ""  # what the open connection runs on: "unix" or "tcp"
        self.base_url = base_url.rstrip("/")
        self._namespace = namespace
        self.url = self.base_url + path
        self.timeout_s = timeout_s
        self._token = token
        self._tls = tls
        self._conn: _ClientConn | None = None
        self._lock = asyncio.Lock()
        self._ids = itertools.count(1)

    async def _where(self) -> tuple[str, int, str]:
        """The stream port and local socket, from ``GET <path>/stream`` on the HTTP port."""
        info_url = self.url + "/stream"
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(info_url, ssl=self._tls if self._tls is not None else True,
                                       timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as resp:
                    if resp.status == 404:
                        raise ProtocolMismatch(
                            f"{self.base_url} serves no stream RPC (an older kvpool?); upgrade "
                            "it, or set [client] rpc = \"ws\" to use its WebSocket RPC")
                    if resp.status != 200:
                        raise Unavailable(f"{info_url} answered HTTP {resp.status}")
                    info = await resp.json()
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            raise Unavailable(f"cannot reach {info_url}: {exc or type(exc).__name__}; is the "
                              "server running?") from None
        if info.get("protocol") != PROTOCOL_VERSION:
            raise ProtocolMismatch(
                f"this client speaks kvpool RPC protocol {PROTOCOL_VERSION} but {self.base_url} "
                f"speaks {info.get('protocol')!r}; run the same kvpool release on both ends")
        host = urlsplit(self.base_url).hostname or "127.0.0.1"
        return host, int(info["port"]), str(info.get("local") or "")

    async def _open_local(self, name: str) -> "_ClientConn | None":
        """A connection on the server's local socket; None where this host cannot reach it
        (another host, or another network namespace), unless that is the only way asked."""
        if not name:
            if self.socket == "unix":
                raise Unavailable(f"{self.base_url} offers no local socket (it speaks TLS, or "
                                  "runs where there is none); set [client] rpc_socket = \"auto\"")
            return None
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, "\0" + name)
        except OSError as exc:
            sock.close()
            if self.socket == "unix":
                raise Unavailable(f"{self.base_url}'s local socket is not reachable from here "
                                  f"({exc}): it is on another host or network namespace; set "
                                  "[client] rpc_socket = \"auto\" to use TCP") from None
            return None
        _, conn = await loop.create_unix_connection(lambda: _ClientConn(self.url), sock=sock)
        return conn

    async def _connect(self) -> "_ClientConn":
        async with self._lock:
            if self._conn is not None and not self._conn.closed:
                return self._conn
            host, port, local = await self._where()
            loop = asyncio.get_running_loop()
            tls: ssl.SSLContext | None = None
            if self.base_url.startswith("https://"):
                tls = self._tls or ssl.create_default_context()
            conn: _ClientConn | None = None
            try:
                async with asyncio.timeout(self.timeout_s):
                    if self.socket != "tcp" and tls is None:
                        conn = await self._open_local(local)
                    elif self.socket == "unix":
                        raise Unavailable(f"{self.base_url} speaks TLS, which its local socket "
                                          "does not; set [client] rpc_socket = \"auto\"")
                    over = "unix" if conn is not None else "tcp"
                    if conn is None:
                        _, conn = await loop.create_connection(
                            lambda: _ClientConn(self.url), host, port, ssl=tls,
                            server_hostname=host if tls else None)
                    hello = {"kvpool": PROTOCOL_VERSION, "token": self._token}
                    if self._namespace:
                        hello["namespace"] = self._namespace
                    conn.send(hello)
                    await conn.hello
            except BaseException as exc:
                if conn is not None:
                    conn.close()
                if not isinstance(exc, (OSError, TimeoutError, ssl.SSLError)):
                    raise
                raise Unavailable(f"cannot open the stream RPC to {host}:{port} ({self.url}): "
                                  f"{exc or type(exc).__name__}") from None
            self._conn, self.over = conn, over
            return conn

    async def call(self, method: str, body: dict[str, Any] | None = None,
                   timeout_s: float | None = None) -> Any:
        conn = self._conn
        if conn is None or conn.closed:
            conn = await self._connect()
        rid = next(self._ids)
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        conn.send([rid, method, body or {}])  # raises Unavailable when the link is down
        conn.pending[rid] = fut
        timeout = timeout_s or self.timeout_s
        timer = loop.call_later(timeout, conn.expire, rid, method, timeout)
        try:
            return await fut
        finally:
            timer.cancel()

    def notify(self, method: str, body: dict[str, Any]) -> bool:
        """Send a call whose answer nobody waits for (request id 0: the answer is dropped),
        without waiting for anything; False when not connected (nothing was sent)."""
        conn = self._conn
        if conn is None or conn.closed:
            return False
        try:
            conn.send([0, method, body])
        except Unavailable:
            return False
        return True

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            await self._conn.lost
            self._conn = None


class _ClientConn(asyncio.Protocol):
    def __init__(self, url: str) -> None:
        self.url = url
        self.transport: asyncio.Transport | None = None
        self.unpacker = _unpacker()
        self.packer = _packer()
        self.pending: dict[int, asyncio.Future[Any]] = {}
        loop = asyncio.get_running_loop()
        self.hello: asyncio.Future[None] = loop.create_future()
        self.lost: asyncio.Future[None] = loop.create_future()
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, obj: Any) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise Unavailable(f"connection to {self.url} closed; is the server running?")
        self.transport.write(self.packer.pack(obj))

    def data_received(self, data: bytes) -> None:
        try:
            self.unpacker.feed(data)
            for frame in self.unpacker:
                if not self.hello.done():
                    self.greeted(frame)
                    continue
                if isinstance(frame, dict):  # the server refused the connection (and hangs up)
                    self.refused(error_from_code(str(frame.get("error", "")),
                                                 str(frame.get("message", ""))))
                    continue
                settle(self.pending, frame)
        except (msgpack.FormatError, msgpack.StackError, msgpack.BufferFull, ValueError,
                TypeError, AttributeError) as exc:
            log.warning("malformed answer from %s: %s; closing the connection", self.url, exc)
            self.close()

    def greeted(self, frame: Any) -> None:
        if not isinstance(frame, dict) or "kvpool" not in frame:
            self.hello.set_exception(ProtocolMismatch(f"{self.url}'s stream port did not answer "
                                                      "with a kvpool hello"))
        elif "error" in frame:
            self.hello.set_exception(error_from_code(str(frame["error"]), str(frame.get("message", ""))))
        elif frame["kvpool"] != PROTOCOL_VERSION:
            self.hello.set_exception(ProtocolMismatch(
                f"this client speaks kvpool RPC protocol {PROTOCOL_VERSION} but {self.url} "
                f"speaks {frame['kvpool']!r}; run the same kvpool release on both ends"))
        else:
            self.hello.set_result(None)

    def refused(self, exc: KVPoolError) -> None:
        """Every call in flight fails with the server's reason (a frame over its limit)."""
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(exc)
        self.pending.clear()
        self.close()

    def expire(self, rid: int, method: str, timeout: float) -> None:
        fut = self.pending.pop(rid, None)
        if fut is not None and not fut.done():
            fut.set_exception(Unavailable(f"{self.url} did not answer {method} within {timeout:.1f}s"))

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.close()
        self.closed = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        gone = Unavailable(f"connection to {self.url} closed; is the server running?")
        if not self.hello.done():
            self.hello.set_exception(gone)
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(gone)
        self.pending.clear()
        if not self.lost.done():
            self.lost.set_result(None)
