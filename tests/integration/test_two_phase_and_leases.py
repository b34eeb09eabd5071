"""Two-phase put, abandoned puts, read leases, and malformed input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import urllib.error

import aiohttp
import msgpack
from aiohttp import web
import numpy as np
import pytest

from clients.client import AsyncPoolClient
from kvpool.codec import make_header
from kvpool.errors import BadRequest, BlockLeased, ProtocolMismatch, TierFull
from kvpool.keys import Namespace, block_keys
from kvpool.wire import PROTOCOL_VERSION, SUBPROTOCOL, RpcClient
from tests.integration.conftest import ROOT, Pool, admin, host_used, make_pool, wait_for

MiB = 1 << 20


def keys_for(tag: str, n: int) -> list[bytes]:
    return block_keys(Namespace("itest2", "uint8", "raw", block_tokens=1, salt=tag), np.arange(n))


async def test_a_block_is_invisible_until_committed(pool: Pool) -> None:
    key = keys_for("invisible", 1)[0]
    value = np.full(MiB, 5, dtype=np.uint8)
    rpc = RpcClient(pool.master_url)
    try:
        res = await rpc.call("reserve", {"keys": [key], "sizes": [MiB]})
        async with AsyncPoolClient(pool.client_config()) as reader:
            assert await reader.exists(key) is False
            assert await reader.match_prefix([key]) == 0
            assert await reader.get(key, np.zeros(MiB, np.uint8)) is None
            # A second writer of the same key is told someone is already storing it.
            assert not (await reader.put(key, value)).stored
            await rpc.call("commit", {"put_id": res["put_id"], "keys": [key],
                                      "headers": [make_header(value, "uint8").encode()]})
            assert await reader.exists(key) is True
    finally:
        await rpc.close()


async def test_commit_with_a_wrong_size_is_refused_and_frees_space(pool: Pool) -> None:
    key = keys_for("wrongsize", 1)[0]
    before = host_used(pool.master_url)
    rpc = RpcClient(pool.master_url)
    try:
        res = await rpc.call("reserve", {"keys": [key], "sizes": [MiB]})
        assert host_used(pool.master_url) == before + MiB
        header = make_header(np.zeros(MiB // 2, np.uint8), "uint8").encode()
        with pytest.raises(BadRequest):
            await rpc.call("commit", {"put_id": res["put_id"], "keys": [key], "headers": [header]})
        assert host_used(pool.master_url) == before
    finally:
        await rpc.close()


def test_a_writer_killed_mid_put_leaves_nothing_and_its_space_returns(pool: Pool) -> None:
    key = keys_for("killed", 1)[0]
    before = host_used(pool.master_url)
    script = (
        "import asyncio, sys, time\n"
        "from kvpool.wire import RpcClient\n"
        "async def main():\n"
        f"    rpc = RpcClient({pool.master_url!r})\n"
        f"    await rpc.call('reserve', {{'keys': [bytes.fromhex({key.hex()!r})], 'sizes': [{4 * MiB}]}})\n"
        "    print('reserved', flush=True)\n"
        "    time.sleep(600)\n"
        "asyncio.run(main())\n")
    writer = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "reserved"  # type: ignore[union-attr]
        assert host_used(pool.master_url) == before + 4 * MiB
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    assert admin(pool.master_url, f"/v1/blocks/{key.hex()}")[0] == 404
    wait_for(lambda: host_used(pool.master_url) == before, 2 + 5, "the abandoned space to return")


async def test_a_leased_block_is_not_removed_until_forced(pool: Pool) -> None:
    key = keys_for("leased", 1)[0]
    async with AsyncPoolClient(pool.client_config()) as client:
        await client.put(key, np.full(MiB, 3, np.uint8))
    rpc = RpcClient(pool.master_url)
    try:
        await rpc.call("get", {"keys": [key]})  # a reader that holds its lease and never releases
        async with AsyncPoolClient(pool.client_config()) as client:
            with pytest.raises(BlockLeased):
                await client.remove(key)
            assert await client.exists(key)
            await client.remove(key, force=True)
            assert not await client.exists(key)
    finally:
        await rpc.close()


async def test_a_leased_block_is_not_evicted(tmp_path) -> None:  # type: ignore[no-untyped-def]
    small = make_pool(tmp_path, daemon_env={"KVPOOL_DAEMON_HOST_BYTES": "32MiB"})
    try:
        keys = keys_for("evict", 48)
        values = [np.random.default_rng(i).integers(0, 256, MiB, dtype=np.uint8) for i in range(48)]
        async with AsyncPoolClient(small.client_config()) as client:
            await client.put(keys[0], values[0])
            rpc = RpcClient(small.master_url)
            try:
                await rpc.call("get", {"keys": [keys[0]]})  # lease held for the whole test
                for k, v in zip(keys[1:], values[1:]):
                    await client.put(k, v)
                tiers = lambda k: {r["tier"] for r in admin(small.master_url, f"/v1/blocks/{k.hex()}")[1]["replicas"]}  # noqa: E731
                wait_for(lambda: any("host" not in tiers(k) for k in keys[1:10]), 10,
                         "older blocks to be demoted out of the host tier")
                assert "host" in tiers(keys[0]), "the leased block was moved out of the host tier"
                out = np.zeros(MiB, np.uint8)
                assert await client.get(keys[0], out) is not None and np.array_equal(out, values[0])
            finally:
                await rpc.close()
    finally:
        small.stop()


async def test_malformed_input_gets_typed_errors_and_servers_keep_serving(pool: Pool) -> None:
    key = keys_for("bad", 1)[0]
    async with AsyncPoolClient(pool.client_config()) as client:
        with pytest.raises(BadRequest):
            await client.exists(b"\x00" * 15)
        with pytest.raises(BadRequest):
            await client.exists("not-a-hex-key-at-all-but-32-char")
        await client.put(key, np.ones(MiB, np.uint8))
        with pytest.raises(BadRequest):  # wrong size: the buffer cannot hold the block
            await client.get(key, np.zeros(MiB // 2, np.uint8))
        with pytest.raises(BadRequest):  # oversized value (max_block_bytes is 256 MiB)
            await client._call("reserve", {"keys": [keys_for("big", 1)[0]], "sizes": [1 << 40]})
    async with aiohttp.ClientSession() as session:
        for url in (f"{pool.master_url}/v1/rpc", f"{pool.daemon_url}/v1/d/rpc"):
            async with session.ws_connect(url, protocols=(SUBPROTOCOL,)) as ws:
                whole = msgpack.packb([7, "get", {"keys": [key]}])
                for frame in (b"\xc1\xff garbage", whole[:-5], msgpack.packb([8, "nope", {}]),
                              msgpack.packb({"not": "a list"})):
                    await ws.send_bytes(frame)
                    rid, status, body = msgpack.unpackb((await ws.receive(timeout=10)).data)
                    assert status == 1 and body["error"] == "bad_request", body
                await ws.send_str("text frame")
                assert msgpack.unpackb((await ws.receive(timeout=10)).data)[2]["error"] == "bad_request"
    status, body = admin(pool.master_url, f"/v1/blocks/{'0' * 32}", method="DELETE")
    assert status == 404 and body["error"] == "not_found"
    assert admin(pool.master_url, "/v1/blocks/xyz")[0] == 400
    async with AsyncPoolClient(pool.client_config()) as client:  # still serving
        out = np.zeros(MiB, np.uint8)
        assert await client.get(key, out) is not None and out.all()
    assert admin(pool.master_url, "/healthz")[0] == 200
    assert admin(pool.daemon_url, "/healthz")[0] == 200


async def test_a_peer_of_another_protocol_version_is_refused_with_both_versions(pool: Pool) -> None:
    async with aiohttp.ClientSession() as session:
        for url in (f"{pool.master_url}/v1/rpc", f"{pool.daemon_url}/v1/d/rpc"):
            for offered in ((), ("kvpool.1",)):  # an unversioned and an older peer
                async with session.get(url, headers={
                        "Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
                        "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
                        **({"Sec-WebSocket-Protocol": ", ".join(offered)} if offered else {})}) as resp:
                    body = await resp.json()
                assert resp.status == 426 and body["error"] == "protocol_mismatch", body
                assert f"protocol {PROTOCOL_VERSION}" in body["message"]
                if offered:
                    assert "speaks 1" in body["message"], body["message"]
    # A client of this release against a server that refuses it says both versions too.
    async def older_server(request: web.Request) -> web.Response:
        return web.json_response({"error": "protocol_mismatch", "message": "old"}, status=426,
                                 headers={"KVPool-Protocol": "1"})

    app = web.Application()
    app.router.add_get("/v1/rpc", older_server)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    rpc = RpcClient(f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(ProtocolMismatch, match=f"protocol {PROTOCOL_VERSION} but .* speaks 1"):
            await rpc.call("exists", {"keys": []})
    finally:
        await rpc.close()
        await runner.cleanup()


def _served_routes() -> set[tuple[str, str]]:
    """(method, path) of every route of the master's aiohttp app, as the router holds them;
    HEAD comes with every GET, and the msgpack RPC is internal (not in the document)."""
    from kvpool.config import MasterConfig
    from master.http import MasterHttp
    from master.server import MasterServer

    server = MasterServer(MasterConfig())
    app = MasterHttp(server.core, server).app()
    return {(r.method.lower(), r.resource.canonical) for r in app.router.routes()
            if r.method != "HEAD" and r.resource is not None and r.resource.canonical != "/v1/rpc"}


def assert_openapi_lists_every_route(master_url: str) -> None:
    """The document a running master serves names exactly the routes it serves, and each of
    them reaches a handler there (a JSON error or a success, never aiohttp's bare 404/405)."""
    import urllib.request

    spec = admin(master_url, "/openapi.json")[1]
    documented = {(m, path) for path, ops in spec["paths"].items() for m in ops}
    assert documented == _served_routes()
    for method, path in sorted(documented):
        # path parameters: a block key, a node id, a request id
        url = path.replace("{key}", "ab" * 16).replace("{node}", "node-x").replace("{request_id}", "r-1")
        req = urllib.request.Request(master_url + url,
                                     method=method.upper(), data=b"{}" if method != "get" else None)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:  # headers only: /v1/events streams
                assert resp.status == 200, (method, path)
        except urllib.error.HTTPError as err:
            assert err.code not in (404, 405) or "error" in json.loads(err.read()), (method, path)


def test_admin_api_openapi_and_metrics(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = make_pool(tmp_path)  # open: credentials are tests/integration/test_security.py's
    try:
        from clients.sync import PoolClient

        key = keys_for("admin", 1)[0]
        with PoolClient(master_url=p.master_url) as client:
            client.put(key, np.ones(4096, np.uint8))
        assert admin(p.master_url, f"/v1/blocks/{key.hex()}/pin", "POST")[0] == 200
        assert admin(p.master_url, f"/v1/blocks/{key.hex()}", "DELETE")[0] == 409
        assert admin(p.master_url, f"/v1/blocks/{key.hex()}?force=no", "DELETE")[0] == 400
        assert admin(p.master_url, f"/v1/blocks/{key.hex()}?force=1", "DELETE")[0] == 200
        assert_openapi_lists_every_route(p.master_url)
        import urllib.request

        text = urllib.request.urlopen(p.master_url + "/metrics", timeout=5).read().decode()
        assert 'kvpool_tier_used_bytes{node="node0",tier="host"}' in text
        assert admin(p.master_url, "/readyz")[1]["ready"] is True
    finally:
        p.stop()


async def test_a_dead_daemon_leaves_the_index_within_its_ttl(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = make_pool(tmp_path)  # node TTL 3 s
    try:
        key = keys_for("deadnode", 1)[0]
        async with AsyncPoolClient(p.client_config()) as client:
            await client.put(key, np.ones(MiB, np.uint8))
            p.kill_daemon(signal.SIGKILL)
            killed = time.monotonic()
            wait_for(lambda: admin(p.master_url, "/v1/cluster")[1]["nodes"] == 0, 3 + 3,
                     "the master to drop the dead daemon")
            assert time.monotonic() - killed < 3 + 3
            assert await client.get(key, np.zeros(MiB, np.uint8)) is None  # a miss, never a dead location
            assert not await client.exists(key)
            with pytest.raises(TierFull) as err:
                await client.put(keys_for("deadnode", 2)[1], np.ones(MiB, np.uint8))
            assert "no pool daemon" in str(err.value)
    finally:
        p.stop()
