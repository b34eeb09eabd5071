"""Bad input, oversized calls, reservation floods and shutdown, against a real `kvpool up`.

Every probe of issue 13 goes to the real process; each must come back as the typed error
a caller can act on (never ``internal`` nor HTTP 500), and the pool must hold exactly
what it held before.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import msgpack
import numpy as np
import pytest

from clients.client import AsyncPoolClient
from kvpool.codec import make_header
from kvpool.config import ClientConfig
from kvpool.errors import KVPoolError, TooLarge
from kvpool.keys import Namespace, block_keys
from kvpool.launcher import spawn, stop
from kvpool.streamrpc import StreamRpcClient
from kvpool.wire import RpcClient
from tests.integration.conftest import DAEMON_ENV, MASTER_ENV, ROOT, master_check

KiB, MiB = 1 << 10, 1 << 20
BLOCK = 256 * KiB
ENV = {**MASTER_ENV, **DAEMON_ENV, "KVPOOL_DAEMON_HOST_BYTES": "64MiB",
       "KVPOOL_MASTER_CLIENT_MAX_PUTS": "16", "KVPOOL_MASTER_PUT_TIMEOUT_S": "20"}


def keys(tag: str, n: int) -> list[bytes]:
    return block_keys(Namespace("robust", "uint8", "raw", block_tokens=1, salt=tag), np.arange(n))


class Up:
    def __init__(self, tmp: Path) -> None:
        self.proc, info = spawn("kvpool", ["up", "--port", "0", "--data-dir", str(tmp / "d")],
                                ENV, tmp / "up.log")
        self.url, self.daemon = info["master"], info["daemon"]


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    pool = Up(tmp_path_factory.mktemp("robust"))
    try:
        yield pool
    finally:
        stop(pool.proc)


def in_thread(coro: Any) -> Any:
    with ThreadPoolExecutor(1) as thread:  # callable from sync tests
        return thread.submit(asyncio.run, coro).result()


def rpc(url: str, method: str, body: Any, path: str = "/v1/rpc") -> str:
    """The error code one call comes back with ('ok' if it succeeded)."""
    async def run() -> str:
        client = RpcClient(url, timeout_s=20, path=path)
        try:
            await client.call(method, body)
            return "ok"
        except KVPoolError as exc:
            return exc.code
        finally:
            await client.close()
    return in_thread(run())


def http(url: str, path: str, method: str = "GET", data: bytes | None = None,
         timeout: float = 20, headers: dict[str, str] | None = None) -> tuple[int, Any, str]:
    """Status, decoded JSON body (None if it is not JSON) and content type."""
    req = urllib.request.Request(url + path, method=method, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw, ctype = resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as err:
        status, raw, ctype = err.code, err.read(), err.headers.get("Content-Type", "")
    try:
        return status, json.loads(raw), ctype
    except ValueError:
        return status, None, ctype


def snapshot(up: Up, stored: list[bytes]) -> dict[str, Any]:
    """What a user can see of the pool: its summary, every tier's use, the stored keys
    and their bytes."""
    async def read() -> list[bytes | None]:
        async with AsyncPoolClient(ClientConfig(master_url=up.url)) as c:
            return [await c.get_bytes(k) for k in stored]
    cluster = http(up.url, "/v1/cluster")[1]
    nodes = http(up.url, "/v1/nodes")[1]
    return {"cluster": cluster, "used": [[t["used"] for t in n["tiers"]] for n in nodes["nodes"]],
            "daemon": http(up.daemon, "/healthz")[1], "bytes": in_thread(read())}


@pytest.fixture(scope="module")
def stored(up: Up) -> list[bytes]:
    ks = keys("stored", 4)

    async def put() -> None:
        async with AsyncPoolClient(ClientConfig(master_url=up.url)) as c:
            for i, k in enumerate(ks):
                await c.put(k, np.full(BLOCK, i + 1, np.uint8))
    in_thread(put())
    return ks


K = keys("probe", 2)
GOOD_HEADER = make_header(np.zeros(4096, np.uint8), "uint8").encode()
NaN_BODY = b'{"fill": NaN}'
RPC_PROBES: list[tuple[str, Any, str]] = [
    ("reserve", {"keys": [K[0]], "sizes": [BLOCK], "parents": 5}, "bad_request"),
    ("reserve", {"keys": [K[0]], "sizes": [BLOCK], "parents": ["zz"]}, "bad_request"),
    ("reserve", {"keys": [K[0]], "sizes": [True]}, "bad_request"),
    ("reserve", {"keys": [K[0]], "sizes": [BLOCK], "replicas": True}, "bad_request"),
    ("reserve", {"keys": [K[0]], "sizes": [BLOCK], "prefer": 5}, "bad_request"),
    ("reserve", {"keys": [K[0]], "sizes": [BLOCK, BLOCK]}, "bad_request"),
    ("reserve", {"keys": 5, "sizes": [BLOCK]}, "bad_request"),
    ("reserve", {"keys": [5], "sizes": [BLOCK]}, "bad_request"),
    ("reserve", {"sizes": [BLOCK]}, "bad_request"),
    ("reserve", {"keys": [K[0]], "sizes": [BLOCK], "ttl_s": -1}, "bad_request"),
    ("reserve", {"keys": [K[0]], "sizes": [BLOCK], "bogus": 1}, "bad_request"),
    ("commit", {"put_id": 1, "keys": [K[0]], "headers": ["abc"]}, "bad_request"),
    ("commit", {"put_id": 1, "keys": [K[0]], "headers": [None]}, "bad_request"),
    ("commit", {"put_id": "x", "keys": [K[0]], "headers": [b"x"]}, "bad_request"),
    ("commit", {"put_id": True, "keys": [K[0]], "headers": [b"x"]}, "bad_request"),
    ("commit", {"put_id": -1, "keys": [K[0]], "headers": [b"x"]}, "bad_request"),
    ("abort", {"put_id": 1.5, "keys": [K[0]]}, "bad_request"),
    ("release", {"leases": ["a"]}, "bad_request"),
    ("release", {"leases": [{}]}, "bad_request"),
    ("release", {"leases": 5}, "bad_request"),
    ("release", {"leases": [-1]}, "bad_request"),
    ("exists", {"keys": [K[0]], "release": "a"}, "bad_request"),
    ("exists", {"keys": [K[0]], "release": [None]}, "bad_request"),
    ("get", {"keys": [K[0]], "release": [{}]}, "bad_request"),
    ("get", {"keys": [b"short"]}, "bad_request"),
    ("exists", {"keys": [K[0]], "bogus": 1}, "bad_request"),
    ("match", {"keys": [K[0]], "prefetch": "yes"}, "bad_request"),
    ("remove", {"keys": [K[0]], "force": "no"}, "bad_request"),
    ("pin", {"keys": [K[0]], "ttl_s": float("nan")}, "bad_request"),
    ("pin", {"keys": [K[0]], "ttl_s": "1"}, "bad_request"),
    ("pin", {"keys": [K[0]], "prefix": 1}, "bad_request"),
    ("unpin", {"keys": [K[0]], "prefix": None, "force": True}, "bad_request"),
    ("agents", {"agents": [1]}, "bad_request"),
    ("agents", {"agents": "x"}, "bad_request"),
    ("corrupt", {"keys": [K[0]], "nodes": [1]}, "bad_request"),
    ("corrupt", {"keys": [K[0]], "nodes": []}, "bad_request"),
    ("heartbeat", {"node_id": 5, "agent": "a"}, "bad_request"),
    ("register", {}, "bad_request"),
    ("register", {"node_id": "n", "tiers": 5}, "bad_request"),
    ("exists", {"keys": [K[0]] * 20000}, "too_large"),
    ("no_such_call", {}, "bad_request"),
]
DAEMON_PROBES: list[tuple[str, Any, str]] = [
    ("copy", {"keys": [K[0]], "src": "host", "dst": "ssd", "locations": ["x"]}, "bad_request"),
    ("copy", {"keys": [K[0]], "src": "host", "dst": "ssd", "locations": [-1]}, "bad_request"),
    ("copy", {"keys": [K[0]], "src": "nvme", "dst": "ssd", "locations": [0]}, "bad_request"),
    ("copy", {"keys": [K[0]], "src": "host", "dst": "ssd", "locations": []}, "bad_request"),
    ("drop", {"tier": 5, "keys": [K[0]]}, "bad_request"),
    ("drop", {"tier": "host", "keys": ["x"]}, "bad_request"),
    ("adopt", {"blocks": [[1, 2, 3]]}, "bad_request"),
    ("adopt", {"blocks": [[K[0], "host", "x", 1, b""]]}, "bad_request"),
    ("adopt", {"blocks": [[K[0], "host", 0, 1, "hdr"]]}, "bad_request"),
    ("registration", {"rescan": "yes"}, "bad_request"),
    # the first block fits, the second lies outside the arena: neither is recorded
    ("adopt", {"blocks": [[K[0], "host", 64 * MiB - 8192, 4096, GOOD_HEADER],
                          [K[1], "host", 1 << 40, 4096, GOOD_HEADER]]}, "bad_request"),
]
DEEP = b"[" * 100_000 + b"]" * 100_000
EVICT_BODIES = [b"[1,2,3]", b'"host"', b"42", b"null", b'{"fill": {}}', b'{"fill": [1]}',
                NaN_BODY, b'{"fill": Infinity}', b'{"fill": 1e400}', b'{"fill": -5}',
                b'{"fill": 7}', b'{"fill": true}', b'{"tier": "nvme"}', b'{"tier": 5}',
                b'{"bogus": 1}', b"{", b"\xff\xfe", DEEP]


def test_every_bad_probe_is_a_typed_error_and_changes_nothing(up: Up, stored: list[bytes]) -> None:
    before = snapshot(up, stored)
    assert all(b is not None for b in before["bytes"])
    got = [(m, b, rpc(up.url, m, b)) for m, b, _ in RPC_PROBES]
    got += [(m, b, rpc(up.daemon, m, b, "/v1/d/rpc")) for m, b, _ in DAEMON_PROBES]
    assert got == RPC_PROBES + DAEMON_PROBES
    for body in EVICT_BODIES:
        status, answer, ctype = http(up.url, "/v1/evict", "POST", body)
        assert (status, answer and answer["error"]) == (400, "bad_request"), (body[:40], answer)
        assert ctype.startswith("application/json") and answer["message"]
    assert snapshot(up, stored) == before
    assert master_check(up.url)["replicas_checked"] >= len(stored)


def test_aiohttp_s_own_refusals_are_json_in_the_same_shape(up: Up, stored: list[bytes]) -> None:
    before = snapshot(up, stored)
    ws = {"Sec-WebSocket-Protocol": "kvpool.2"}  # the RPC's, but no WebSocket upgrade
    cases = [("/nope", "GET", None, {}, 404, "no_route"),
             ("/v1/cluster", "DELETE", None, {}, 405, "method_not_allowed"),
             ("/v1/evict", "GET", None, {}, 405, "method_not_allowed"),
             ("/v1/evict", "POST", b"[" + b"0," * (33 * MiB) + b"0]", {}, 413, "too_large"),
             ("/v1/rpc", "GET", None, ws, 400, "bad_request"),
             ("/v1/rpc", "GET", None, {}, 426, "protocol_mismatch"),
             ("/v1/blocks/zz", "GET", None, {}, 400, "bad_request"),
             (f"/v1/blocks/{stored[0].hex()}?force=maybe", "DELETE", None, {}, 400, "bad_request")]
    for path, method, data, headers, status, code in cases:
        got, answer, ctype = http(up.url, path, method, data, headers=headers)
        assert (got, answer and answer.get("error")) == (status, code), (path, method, answer)
        assert ctype.startswith("application/json") and answer["message"]
    got, answer, _ = http(up.daemon, "/nope")
    assert (got, answer and answer.get("error")) == (404, "no_route")
    assert snapshot(up, stored) == before


SEND_HUGE_FRAME = """
import asyncio, os, sys, aiohttp, msgpack
from kvpool.wire import SUBPROTOCOL
frame = msgpack.packb([7, "exists", {"keys": [os.urandom(16) for _ in range(3_670_000)]}],
                      use_bin_type=True)
async def main():
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(sys.argv[1] + "/v1/rpc", protocols=(SUBPROTOCOL,),
                                      max_msg_size=128 << 20) as ws:
            print("sending", flush=True)
            await ws.send_bytes(frame)
            msg = await ws.receive(timeout=60)
            sys.stdout.buffer.write(msg.data)
asyncio.run(main())
"""


def test_a_huge_frame_is_refused_and_the_loop_keeps_serving(up: Up) -> None:
    """3.67 M keys in one exists frame (63 MiB) blocked the master's loop for 3 s; now it is
    refused before its body is decoded, and /healthz answers throughout. The frame is
    built and sent by a process of its own, so this one's GIL times only the master."""
    sender = subprocess.Popen([sys.executable, "-c", SEND_HUGE_FRAME, up.url], cwd=ROOT,
                              stdout=subprocess.PIPE)
    assert sender.stdout is not None and sender.stdout.readline() == b"sending\n"
    slowest, done = [0.0], threading.Event()

    def poll() -> None:
        while not done.is_set():
            t = time.perf_counter()
            assert http(up.url, "/healthz", timeout=30)[0] == 200
            slowest[0] = max(slowest[0], time.perf_counter() - t)
            time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        answer = sender.stdout.read()
        assert sender.wait(timeout=60) == 0
    finally:
        done.set()
        poller.join()
    rid, status, body = msgpack.unpackb(answer, raw=False)
    assert (rid, status, body["error"]) == (7, 1, "too_large") and "limit" in body["message"]
    assert slowest[0] < 1.0, f"/healthz took {slowest[0]:.2f}s while the frame was handled"


async def test_a_stream_frame_over_the_limit_fails_its_calls_with_too_large(up: Up,
                                                                            stored: list[bytes]) -> None:
    """On the stream RPC the frame's size is known only as it arrives: the server refuses
    it before decoding it and hangs up; the calls in flight get TooLarge (not a vague lost
    connection), and the client's next call opens a fresh connection."""
    rpc_client = StreamRpcClient(up.url, timeout_s=30)
    try:
        with pytest.raises(TooLarge, match="split the batch"):
            await rpc_client.call("exists", {"keys": keys("huge", 300_000)})
        assert (await rpc_client.call("exists", {"keys": stored}))["present"] == [True] * len(stored)
    finally:
        await rpc_client.close()


async def test_the_client_splits_batches_longer_than_a_call_may_carry(up: Up, stored: list[bytes]) -> None:
    many = keys("many", 40_000)
    async with AsyncPoolClient(ClientConfig(master_url=up.url)) as c:
        assert await c.batch_exists(stored + many) == [True] * len(stored) + [False] * len(many)
        assert await c.match_prefix(stored + many) == len(stored)
        assert await c.match_prefix(many) == 0


async def test_a_reservation_flood_is_refused_and_other_clients_keep_putting(up: Up) -> None:
    flood = RpcClient(up.url)
    ks = keys("flood", 64)
    puts = []
    try:
        refused = None
        for i, k in enumerate(ks):
            try:
                puts.append(((await flood.call("reserve", {"keys": [k], "sizes": [BLOCK]}))["put_id"], k))
            except KVPoolError as exc:
                refused = (i, exc)
                break
        assert refused is not None and refused[0] == 16, refused
        assert refused[1].code == "too_many_pending" and refused[1].retryable
        assert "client_max_puts" in str(refused[1])
        async with AsyncPoolClient(ClientConfig(master_url=up.url)) as other:  # another client
            mine = keys("legit", 20)
            for i, k in enumerate(mine):
                assert (await other.put(k, np.full(BLOCK, i, np.uint8))).stored
            assert [await other.get_bytes(k) for k in mine] == [
                bytes(np.full(BLOCK, i, np.uint8)) for i in range(len(mine))]
        # Aborting gives the client its allowance back.
        for put_id, k in puts:
            await flood.call("abort", {"put_id": put_id, "keys": [k]})
        puts.clear()
        # A big lone reservation is allowed; a second one past half the arenas is not.
        big = keys("big", 2)
        res = await flood.call("reserve", {"keys": [big[0]], "sizes": [30 * MiB]})
        puts.append((res["put_id"], big[0]))
        with pytest.raises(KVPoolError) as exc:
            await flood.call("reserve", {"keys": [big[1]], "sizes": [8 * MiB]})
        assert exc.value.code == "too_many_pending" and "client_max_reserved" in str(exc.value)
    finally:
        for put_id, k in puts:
            await flood.call("abort", {"put_id": put_id, "keys": [k]})
        await flood.close()
    assert http(up.url, "/v1/cluster")[1]["pending"] == 0


async def test_check_passes_at_any_moment_of_a_demotion_storm(up: Up) -> None:
    """Writers fill the 64 MiB host arena twice over, so demotion to SSD runs the whole
    time; `check` called meanwhile must never report a block in flight as a fault."""
    stop_checking = asyncio.Event()
    results: list[str] = []

    async def checker() -> None:
        rpc = RpcClient(up.url, timeout_s=30)
        try:
            while not stop_checking.is_set():
                try:
                    await rpc.call("check")
                    results.append("ok")
                except KVPoolError as exc:
                    results.append(str(exc))
                await asyncio.sleep(0.01)
        finally:
            await rpc.close()

    async def writer(tag: str, n: int) -> None:
        async with AsyncPoolClient(ClientConfig(master_url=up.url)) as c:
            ks = keys(tag, n)
            for start in range(0, n, 8):
                await c.batch_put(ks[start:start + 8],
                                  [np.full(BLOCK, i % 251, np.uint8) for i in range(start, min(n, start + 8))])

    checking = asyncio.create_task(checker())
    try:
        await asyncio.gather(writer("storm-a", 256), writer("storm-b", 256))
    finally:
        stop_checking.set()
        await checking
    demoted = http(up.url, "/metrics")
    assert len(results) >= 5 and all(r == "ok" for r in results), [r for r in results if r != "ok"][:3]
    nodes = http(up.url, "/v1/nodes")[1]["nodes"]
    assert any(t["kind"] == "ssd" and t["blocks"] > 0 for t in nodes[0]["tiers"]), demoted


def _event_stream(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(f"GET /v1/events HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    assert b"200" in sock.recv(1024).split(b"\r\n")[0]
    return sock


def test_sigterm_stops_kvpool_up_promptly_with_streams_and_rpc_open(tmp_path: Path) -> None:
    pool = Up(tmp_path)
    stream = _event_stream(pool.url)
    conn_ready, release = threading.Event(), threading.Event()

    def hold_rpc() -> None:  # an engine's connection, idle but open
        async def run() -> None:
            client = RpcClient(pool.url)
            await client.call("exists", {"keys": []})
            conn_ready.set()
            while not release.is_set():
                await asyncio.sleep(0.05)
            await client.close()
        asyncio.run(run())

    holder = threading.Thread(target=hold_rpc)
    holder.start()
    try:
        assert conn_ready.wait(20)
        t = time.monotonic()
        pool.proc.send_signal(signal.SIGTERM)
        rc = pool.proc.wait(timeout=30)
        took = time.monotonic() - t
    finally:
        release.set()
        holder.join()
        stream.close()
        stop(pool.proc)
    assert rc == 0 and took < 5.0, f"exit {rc} after {took:.1f}s"
