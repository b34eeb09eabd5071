"""Which socket the stream RPC's client takes: the server's local Unix socket where this
host reaches it, TCP where it does not, and a typed error when the local one is forced but
cannot be had. An in-process server; tests/integration/test_hot_path.py runs the master's."""

from __future__ import annotations

from typing import Any, AsyncIterator

import pytest
from aiohttp import web

from kvpool.errors import Unavailable
from kvpool.streamrpc import StreamRpcClient, StreamRpcServer
from kvpool.wire import PROTOCOL_VERSION


async def echo(body: dict[str, Any]) -> Any:
    return {"echo": body["x"]}


@pytest.fixture
async def server() -> AsyncIterator[tuple[str, StreamRpcServer, dict[str, str]]]:
    """A stream RPC server and its HTTP info route; ``seen["local"]``, when set, is the
    local name the route gives out instead of the real one (a server on another host)."""
    rpc = StreamRpcServer({"echo": echo}, eager=frozenset({"echo"}))
    await rpc.start("127.0.0.1", 0)
    seen: dict[str, str] = {}

    async def info(request: web.Request) -> web.Response:
        return web.json_response({"port": rpc.port, "protocol": PROTOCOL_VERSION,
                                  "tls": False, "local": seen.get("local", rpc.local)})

    app = web.Application()
    app.router.add_get("/v1/rpc/stream", info)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", rpc, seen
    await runner.cleanup()
    await rpc.close()


async def test_on_the_servers_host_the_client_takes_its_local_socket(server) -> None:  # type: ignore[no-untyped-def]
    url, rpc, _ = server
    assert rpc.local.startswith("kvpool-rpc-")
    for socket, over in (("auto", "unix"), ("unix", "unix"), ("tcp", "tcp")):
        client = StreamRpcClient(url, socket=socket)
        assert await client.call("echo", {"x": socket}) == {"echo": socket}
        assert client.over == over
        await client.close()


async def test_where_the_local_socket_reaches_nothing_auto_takes_tcp_and_unix_says_why(server) -> None:  # type: ignore[no-untyped-def]
    url, rpc, seen = server
    seen["local"] = "kvpool-rpc-" + "0" * 24  # another host's name: nothing here listens on it
    auto = StreamRpcClient(url)
    assert await auto.call("echo", {"x": 1}) == {"echo": 1}
    assert auto.over == "tcp"
    await auto.close()
    forced = StreamRpcClient(url, socket="unix")
    with pytest.raises(Unavailable, match="another host or network namespace"):
        await forced.call("echo", {"x": 2})
    await forced.close()


def test_a_socket_choice_that_does_not_exist_is_refused() -> None:
    with pytest.raises(ValueError, match="auto, tcp, unix"):
        StreamRpcClient("http://127.0.0.1:1", socket="shm")
