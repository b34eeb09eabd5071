"""Stock vLLM (``vllm serve``, CPU, float32, a small random-weight Llama) with kvpool as its
KV connector, against a real pool: a second instance serves a prefix from the pool with
the exact bytes the first computed and the tokens of a vLLM without the connector;
prefill → pool → decode through the router gives those tokens too, streaming or not;
removed or corrupt blocks are recomputed; another dtype reuses nothing; a dead pool
changes nothing but speed. Four vLLM processes, started once for the module."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import struct
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest

pytest.importorskip("vllm")

from kvpool.launcher import free_port, spawn, stop  # noqa: E402
from engine.vllm_kv import launch  # noqa: E402
from engine.vllm_kv.tiny_model import build  # noqa: E402
from kvpool.protocol import Call, ReadGrant  # noqa: E402
from kvpool.transfer import TransferAgent  # noqa: E402
from kvpool.wire import RpcClient  # noqa: E402
from tests.e2e.conftest import POOL_ENV  # noqa: E402

pytestmark = pytest.mark.timeout(900)
BT = 32
LAYERS = 2  # the small model's


@dataclass
class VStack:
    tmp: Path
    master: str = ""
    pool: Any = None
    vllm: dict[str, launch.VLLM] = field(default_factory=dict)
    router: str = ""
    router_proc: Any = None
    events: list[Any] = field(default_factory=list)  # the prefill instance's KV events
    decode_events: list[Any] = field(default_factory=list)  # the decode instance's

    def audit(self, name: str) -> list[dict[str, str]]:
        path = self.tmp / f"audit-{name}.jsonl"
        return [json.loads(l) for l in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def vs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VStack]:
    tmp = tmp_path_factory.mktemp("vllm")
    s = VStack(tmp)
    model = build(tmp / "model", layers=LAYERS)
    s.pool, info = spawn("kvpool", ["up", "--port", "0", "--data-dir", str(tmp / "pool")],
                         POOL_ENV, tmp / "pool.log")
    s.master = info["master"]
    events_port, decode_events_port = free_port(), free_port()
    for port, out in ((events_port, s.events), (decode_events_port, s.decode_events)):
        listening = threading.Event()
        threading.Thread(target=subscribe, args=(port, out, listening), daemon=True).start()
        listening.wait(10)
    try:
        def audit(name: str) -> dict[str, object]:
            return {"audit_path": str(tmp / f"audit-{name}.jsonl"), "timeout_s": 1.0, "retry_s": 2.0}

        s.vllm = {
            "base": launch.start("base", model, tmp / "base.log"),
            "prefill": launch.start("prefill", model, tmp / "prefill.log", role="kv_producer",
                                    master=s.master, extra={**audit("prefill"), "event_token_ids": True},
                                    events_port=events_port),
            "decode": launch.start("decode", model, tmp / "decode.log", role="kv_consumer",
                                   master=s.master, extra=audit("decode"),
                                   events_port=decode_events_port),
            "bf16": launch.start("bf16", model, tmp / "bf16.log", role="kv_both", master=s.master,
                                 dtype="bfloat16", extra=audit("bf16")),
        }
        launch.wait_ready(list(s.vllm.values()))
        s.router_proc, info = spawn("engine.vllm_kv.router", [
            "--prefill", s.vllm["prefill"].url, "--decode", s.vllm["decode"].url,
            "--block-tokens", str(BT)], {}, tmp / "router.log")
        s.router = info["url"]
        yield s
    finally:
        if s.router_proc is not None:
            stop(s.router_proc)
        for v in s.vllm.values():
            v.stop()
        if s.pool is not None:
            stop(s.pool)


def post(url: str, body: dict[str, Any], timeout: float = 120.0) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def sse(url: str, body: dict[str, Any], timeout: float = 120.0) -> list[dict[str, Any]]:
    req = urllib.request.Request(url, data=json.dumps({**body, "stream": True}).encode(),
                                 headers={"Content-Type": "application/json"})
    out = []
    with urllib.request.urlopen(req, timeout=timeout) as r:
        for raw in r:
            line = raw.decode().strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                out.append(json.loads(line[6:]))
    return out


def prompt(seed: int, n: int) -> list[int]:
    return [int(t) for t in np.random.default_rng(seed).integers(4, 500, n)]


def complete(url: str, tokens: list[int], max_tokens: int = 12) -> tuple[list[int], int]:
    """Greedy completion: (generated token ids, prompt tokens vLLM did not compute)."""
    r = post(f"{url}/v1/completions", {"model": "tiny", "prompt": tokens, "max_tokens": max_tokens,
                                       "temperature": 0, "return_token_ids": True})
    details = (r.get("usage") or {}).get("prompt_tokens_details") or {}
    return list(r["choices"][0]["token_ids"]), int(details.get("cached_tokens") or 0)


def pool_keys(vs: VStack, name: str, op: str) -> list[str]:
    return [a["key"] for a in vs.audit(name) if a["op"] == op]


def test_second_instance_loads_the_prefix_bit_exact_with_the_same_tokens(vs: VStack) -> None:
    p = prompt(1, 6 * BT + 10)
    ref, base_cached = complete(vs.vllm["base"].url, p)
    assert base_cached == 0
    first, _ = complete(vs.vllm["prefill"].url, p)
    assert first == ref
    saves = [a for a in vs.audit("prefill") if a["op"] == "save"]
    saved = {a["key"]: a["xxh3"] for a in saves}
    assert len(saved) == 6  # every full prompt block
    # written while the forward ran: each layer's share as soon as its attention filled it
    assert {a["parts"] for a in saves} == {LAYERS}
    again, cached = complete(vs.vllm["decode"].url, p)
    assert again == ref
    assert cached == 6 * BT  # vLLM's own count: the prefix came from outside
    loaded = {a["key"]: a["xxh3"] for a in vs.audit("decode") if a["op"] == "load"}
    assert loaded == saved  # the bytes in the decode cache are the bytes prefill computed


def test_saved_blocks_are_announced_as_vllm_kv_events(vs: VStack) -> None:
    """BlockStored in vLLM's schema on vLLM's own publisher: kvpool keys, the pool tier,
    the blocks' tokens (configured here), chained by parent."""
    saved = pool_keys(vs, "prefill", "save")[:6]  # the first test's prompt
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        ours = [e for e in list(vs.events) if type(e).__name__ == "BlockStored" and e.medium == "host"]
        if [h.hex() for e in ours for h in e.block_hashes][:6] == saved:
            break
        time.sleep(0.2)
    hashes = [h for e in ours for h in e.block_hashes]
    assert [h.hex() for h in hashes][:6] == saved and all(len(h) == 16 for h in hashes)
    first = ours[0]
    assert first.parent_block_hash is None and first.block_size == BT
    assert first.token_ids[:BT] == prompt(1, 6 * BT + 10)[:BT]
    vllm_own = [e for e in vs.events if type(e).__name__ == "BlockStored" and e.medium != "host"]
    assert vllm_own  # vLLM's own cache events travel beside ours


def test_router_prefill_pool_decode_same_tokens_streaming_and_not(vs: VStack) -> None:
    p = prompt(2, 5 * BT + 3)
    ref, _ = complete(vs.vllm["base"].url, p, 10)
    before = len(pool_keys(vs, "decode", "load"))
    got, cached = complete(vs.router, p, 10)
    assert got == ref and cached == 5 * BT
    assert len(pool_keys(vs, "decode", "load")) == before + 5
    body = {"model": "tiny", "prompt": p, "max_tokens": 10, "temperature": 0, "return_token_ids": True}
    chunks = sse(f"{vs.router}/v1/completions", body)
    assert [t for c in chunks for t in c["choices"][0].get("token_ids") or []] == ref

    chat = {"model": "tiny", "messages": [{"role": "user", "content": "the pool keeps blocks " * 30}],
            "max_tokens": 8, "temperature": 0}
    want = post(f"{vs.vllm['base'].url}/v1/chat/completions", chat)["choices"][0]["message"]["content"]
    r = post(f"{vs.router}/v1/chat/completions", chat)
    assert r["choices"][0]["message"]["content"] == want
    assert (r["usage"].get("prompt_tokens_details") or {}).get("cached_tokens", 0) > 0
    streamed = "".join(c["choices"][0]["delta"].get("content") or ""
                       for c in sse(f"{vs.router}/v1/chat/completions", chat) if c["choices"])
    assert streamed == want


def test_removed_blocks_are_recomputed_with_the_same_tokens(vs: VStack) -> None:
    p = prompt(3, 5 * BT + 7)
    ref, _ = complete(vs.vllm["base"].url, p)
    n = len(pool_keys(vs, "prefill", "save"))
    assert complete(vs.vllm["prefill"].url, p)[0] == ref
    keys = pool_keys(vs, "prefill", "save")[n:]
    assert len(keys) == 5
    for key in keys[2:]:
        req = urllib.request.Request(f"{vs.master}/v1/blocks/{key}", method="DELETE")
        urllib.request.urlopen(req, timeout=10).close()
    got, cached = complete(vs.vllm["decode"].url, p)
    assert got == ref and cached == 2 * BT


def test_a_corrupt_block_is_recomputed_with_the_same_tokens(vs: VStack) -> None:
    p = prompt(4, 4 * BT + 1)
    ref, _ = complete(vs.vllm["base"].url, p)
    n = len(pool_keys(vs, "prefill", "save"))
    assert complete(vs.vllm["prefill"].url, p)[0] == ref
    keys = pool_keys(vs, "prefill", "save")[n:]
    asyncio.run(corrupt(vs.master, bytes.fromhex(keys[1])))
    loads = len(pool_keys(vs, "decode", "load"))
    got, _ = complete(vs.vllm["decode"].url, p)
    assert got == ref
    assert pool_keys(vs, "decode", "load")[loads:] == keys[:1]  # only the block before it landed
    with pytest.raises(urllib.error.HTTPError):  # the pool dropped the corrupt block
        urllib.request.urlopen(f"{vs.master}/v1/blocks/{keys[1]}", timeout=10)
    # ... and the instance that found it says so, naming the tier it was read from
    deadline = time.monotonic() + 10
    removed: list[Any] = []
    while not removed and time.monotonic() < deadline:
        removed = [e for e in list(vs.decode_events) if type(e).__name__ == "BlockRemoved"
                   and bytes.fromhex(keys[1]) in e.block_hashes]
        time.sleep(0.2)
    assert [e.medium for e in removed] == ["host"]  # the pool's host arena held it


def test_another_dtype_reuses_nothing(vs: VStack) -> None:
    p = prompt(1, 6 * BT + 10)  # the first test's prompt: its float32 blocks are in the pool
    _, cached = complete(vs.vllm["bf16"].url, p)
    assert cached == 0
    saved = set(pool_keys(vs, "bf16", "save"))
    assert len(saved) == 6 and not saved & set(pool_keys(vs, "prefill", "save"))


def send_and_hang_up(url: str, body: dict[str, Any], after_s: float) -> None:
    """A streaming request whose client goes away ``after_s`` after sending it: vLLM
    aborts the request when it notices the closed connection."""
    host, port = url.removeprefix("http://").split(":")
    data = json.dumps({**body, "stream": True}).encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(data), data))
        time.sleep(after_s)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # RST


@contextlib.contextmanager
def throttled(pid: int, run_s: float = 0.005, stopped_s: float = 0.045) -> Iterator[None]:
    """The process at about a tenth of its speed (SIGSTOP and SIGCONT in turn), so that
    its work on a request (a load's promotion and copies) spans many milliseconds."""
    done = threading.Event()

    def cycle() -> None:
        while not done.is_set():
            os.kill(pid, signal.SIGSTOP)
            time.sleep(stopped_s)
            os.kill(pid, signal.SIGCONT)
            time.sleep(run_s)

    thread = threading.Thread(target=cycle)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        os.kill(pid, signal.SIGCONT)


def test_requests_aborted_while_their_load_is_in_flight_change_nothing(vs: VStack) -> None:
    """Clients that hang up while the decode instance loads their prefix: vLLM holds the
    blocks until the load ends, nothing hangs, the pool keeps whole blocks only, and the
    same prompts later get the same tokens, any prefix they load bit-exact. The prefixes
    are demoted to the SSD tier first and the pool runs throttled while the clients hang
    up, so a load (which promotes them) takes long enough for a hang-up to land during it."""
    decode_log = vs.tmp / "decode.log"
    in_flight = "finished while its load was in flight"
    before = decode_log.read_text(errors="replace").count(in_flight)
    n_blocks, seen, batch = 60, 0, []
    for attempt in range(6):  # until some hang-up lands during a load (a race, won at once so far)
        batch = [prompt(100 + 4 * attempt + i, n_blocks * BT + 5) for i in range(4)]
        for p in batch:  # into the pool, then down to its SSD tier
            complete(vs.vllm["prefill"].url, p, 1)
        post(f"{vs.master}/v1/evict", {"tier": "host", "fill": 0.0})
        body = {"model": "tiny", "max_tokens": 12, "temperature": 0}
        hangs = [threading.Thread(target=send_and_hang_up, args=(
            vs.vllm["decode"].url, {**body, "prompt": p}, 0.05 + 0.12 * i + 0.03 * attempt))
            for i, p in enumerate(batch)]
        with throttled(vs.pool.pid):
            for t in hangs:
                t.start()
            for t in hangs:
                t.join(30)
        time.sleep(2.5)  # past retry_s, should a slow promotion have timed a load out
        seen = decode_log.read_text(errors="replace").count(in_flight) - before
        if seen:
            break
    assert seen > 0, "no hang-up landed while a load was in flight"
    with urllib.request.urlopen(f"{vs.vllm['decode'].url}/health", timeout=10) as r:
        assert r.status == 200
    saved = {a["key"]: a["xxh3"] for a in vs.audit("prefill") if a["op"] == "save"}
    from_pool = 0
    for p in batch:  # the prompts whose loads were cut short: the same tokens, whole blocks
        ref, _ = complete(vs.vllm["base"].url, p)
        loads = len(pool_keys(vs, "decode", "load"))
        got, cached = complete(vs.vllm["decode"].url, p)
        assert got == ref
        landed = [a for a in vs.audit("decode") if a["op"] == "load"][loads:]
        assert all(saved[a["key"]] == a["xxh3"] for a in landed)
        from_pool += cached == n_blocks * BT
    assert from_pool > 0  # the prefixes are still served from the pool (or vLLM kept them)


def test_a_dead_pool_changes_nothing_but_speed(vs: VStack) -> None:
    before = len((vs.tmp / "decode.log").read_text(errors="replace"))  # earlier tests' warnings
    stop(vs.pool, signal.SIGKILL)
    vs.pool = None
    for i, n in enumerate((3 * BT + 5, 4 * BT)):
        p = prompt(10 + i, n)
        ref, _ = complete(vs.vllm["base"].url, p)
        t0 = time.monotonic()
        assert complete(vs.vllm["decode"].url, p)[0] == ref
        assert complete(vs.vllm["prefill"].url, p)[0] == ref
        assert complete(vs.router, p)[0] == ref
        assert time.monotonic() - t0 < 60
    log = (vs.tmp / "decode.log").read_text(errors="replace")[before:]
    assert log.count("serving without the pool") == 1  # one warning, not one per request


def subscribe(port: int, out: list[Any], listening: threading.Event) -> None:
    """Collect the KV events vLLM publishes to ``port`` (ZMQ, msgpack batches); an endpoint
    with a host makes vLLM's publisher connect, so this side binds (loopback only)."""
    import msgspec
    import zmq
    from vllm.distributed.kv_events import KVEventBatch

    sock = zmq.Context.instance().socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.bind(f"tcp://127.0.0.1:{port}")
    decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
    listening.set()
    while True:
        frames = sock.recv_multipart()
        out.extend(decoder.decode(frames[-1]).events)


async def corrupt(master: str, key: bytes) -> None:
    """Overwrite a stored block's bytes in the daemon's arena (as a bit flip in memory would):
    its checksum no longer matches, which only a reader can notice."""
    rpc = RpcClient(master)
    agent = TransferAgent("test-corrupter", progress_thread=False)
    try:
        res = await rpc.call(Call.GET, {"keys": [key]})
        grant = ReadGrant.unpack(res["items"][0])
        assert grant is not None, "the block to corrupt is not in the pool"
        loc = grant.location
        peer, address, size, mem, device = loc.agent, loc.address, loc.size, loc.mem_type, loc.device
        meta = (await rpc.call(Call.AGENTS, {"agents": [peer]}))["metadata"]
        agent.add_peer(bytes(meta[peer]))
        junk = np.full(size, 0xAB, dtype=np.uint8)
        agent.register(junk.ctypes.data, junk.nbytes, owner=junk)
        await agent.run("WRITE", peer, [(junk.ctypes.data, size, 0)], "DRAM",
                        [(address, size, device)], mem, 5.0)
        await rpc.call(Call.RELEASE, {"leases": [res["lease"]]})
    finally:
        agent.close()
        await rpc.close()
