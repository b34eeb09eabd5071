"""The router (the conductor of the Mooncake paper): picks a prefill engine and a decode
engine for each request, or one mono engine, and streams the tokens back.

A prefill engine is chosen by the work it would have to do before this request's first
token: the prompt tokens queued on it, plus what this prompt costs there. Each engine
reports its own KV pages as KV events (``/v1/events``), and the pool's master reports the
pool's blocks in the same schema; the router follows both streams and, as Dynamo weighs
device over host over disk, counts a block in the engine's own pages as free, a block it
would load from the pool as a fraction of computing it (less from a host arena than from
SSD or the object tier), and a block found nowhere as computed in full. A decode engine
is chosen by the requests it is running. An engine that fails is skipped until its
/healthz answers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from engine import tokenizer
from engine.http import NDJSON, error_response, line, read_json, serve
from kvpool import event_stream, tracing
from kvpool.auth import bearer, secret
from kvpool.errors import BadRequest, KVPoolError, Unavailable, error_from_code
from kvpool.keys import BlockKey, Namespace, block_keys
from kvpool.tasks import TaskOwner

log = logging.getLogger(__name__)


# What loading a block from the pool costs, as a fraction of computing it, by the
# medium the pool holds it in (the engine's own pages cost nothing).
LOAD_COST = {"gpu": 0.05, "host": 0.1, "ssd": 0.3, "object": 0.5}


class BlockView:
    """Which blocks a stream of KV events says are held, and in which media. Events carry
    32-hex keys; ``EventsLost`` (this follower missed some) forgets everything, so the
    view under-claims rather than routes to pages that are gone."""

    def __init__(self) -> None:
        self.held: dict[BlockKey, dict[tuple[str, str], None]] = {}

    def __len__(self) -> int:
        return len(self.held)

    def __contains__(self, key: object) -> bool:
        return key in self.held

    def apply(self, event: dict[str, Any]) -> None:
        kind = event.get("type")
        if kind in ("AllBlocksCleared", "EventsLost"):
            self.held.clear()
            return
        where = (str(event.get("node")), str(event.get("medium")))
        for raw in event.get("block_hashes") or ():
            key = bytes.fromhex(raw)
            if kind == "BlockStored":
                self.held.setdefault(key, {})[where] = None
            elif kind == "BlockRemoved":
                places = self.held.get(key)
                if places is not None:
                    places.pop(where, None)
                    if not places:
                        del self.held[key]

    def leading(self, keys: list[BlockKey]) -> int:
        n = 0
        while n < len(keys) and keys[n] in self.held:
            n += 1
        return n

    def load_cost(self, key: BlockKey) -> float | None:
        """The cheapest medium's cost of loading a held block; None when not held."""
        places = self.held.get(key)
        if not places:
            return None
        return min(LOAD_COST.get(medium, 1.0) for _, medium in places)


@dataclass(eq=False)
class EngineRef:
    url: str
    role: str
    ns: Namespace | None = None
    vocab: int = 256
    healthy: bool = True
    running: int = 0
    running_tokens: int = 0
    pages: BlockView = field(default_factory=BlockView)  # its own pages, as it reports them
    reports: bool = False  # it reports its pages; else ``sent`` guesses them
    capacity: int = 0  # without reports: how many recent blocks the engine can keep
    sent: OrderedDict[BlockKey, None] = field(default_factory=OrderedDict)

    def overlap(self, keys: list[BlockKey]) -> int:
        """Its cached blocks at the start of ``keys``: as it reports them, or for an engine
        that does not (a stock vLLM instance), as guessed from what was sent to it."""
        if self.reports:
            return self.pages.leading(keys)
        n = 0
        while n < len(keys) and keys[n] in self.sent:
            n += 1
        return n

    def remember(self, keys: list[BlockKey]) -> None:
        """The guess for an engine that does not report its pages: it holds what it was
        sent, the prefix as the most recent (engines let the leaves go first)."""
        for key in reversed(keys):
            self.sent[key] = None
            self.sent.move_to_end(key)
        while len(self.sent) > self.capacity:
            self.sent.popitem(last=False)


class Router:
    def __init__(self, prefill: list[str], decode: list[str], mono: list[str],
                 pool: str = "", pool_token: str = "") -> None:
        if mono and (prefill or decode):
            raise BadRequest("give the router either mono engines or prefill and decode engines")
        if not mono and not (prefill and decode):
            raise BadRequest("the router needs at least one prefill and one decode engine, "
                             "or --mono engines")
        self.mode = "mono" if mono else "disagg"
        self.engines = [EngineRef(u.rstrip("/"), r) for r, urls in
                        (("prefill", prefill), ("decode", decode), ("mono", mono)) for u in urls]
        self.pool_url = pool.split(",")[0].rstrip("/")
        self.pool_headers = bearer(pool_token)
        self.pool = BlockView()  # the pool's blocks, as its master reports them
        self.session: aiohttp.ClientSession | None = None
        self._tasks = TaskOwner("router")  # the health probe, the event followers
        self.app = web.Application()
        self.spans = tracing.SpanRing("router")
        self.app.add_routes([web.get("/healthz", self.healthz), web.get("/v1/engines", self.list),
                             web.post("/v1/generate", self.generate),
                             web.get("/v1/traces/{request_id}", self.trace)])

    async def start(self) -> "Router":
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=5,
                                                                           sock_read=120))
        await asyncio.gather(*(self._describe(e) for e in self.engines))
        vocabs = {e.vocab for e in self.engines}
        if len(vocabs) != 1:
            raise BadRequest(f"engines disagree on the vocabulary size: {sorted(vocabs)}")
        self._tasks.spawn(self._probe(), name="router-health")
        for e in self.engines:
            if e.role != "decode":
                e.reports = True
                self._tasks.spawn(self._follow(f"{e.url}/v1/events", e.pages), name=f"router-events-{e.url}")
        if self.pool_url:
            self._tasks.spawn(self._follow(f"{self.pool_url}/v1/events", self.pool, self.pool_headers),
                              name="router-events-pool")
        return self

    async def _follow(self, url: str, view: BlockView, headers: dict[str, str] | None = None) -> None:
        """Keep ``view`` up to date from a KV event stream, from the oldest event it holds."""
        assert self.session is not None
        async for event in event_stream.subscribe(self.session, url, headers, last=0):
            view.apply(event)

    async def stop(self) -> None:
        await self._tasks.cancel()
        if self.session is not None:
            await self.session.close()

    async def _describe(self, e: EngineRef) -> None:
        assert self.session is not None
        try:
            async with self.session.get(f"{e.url}/v1/info") as resp:
                info = await resp.json()
        except (aiohttp.ClientError, OSError) as exc:
            raise Unavailable(f"engine {e.url} does not answer ({exc}); start it first") from None
        if info["role"] != e.role:
            raise BadRequest(f"{e.url} is a {info['role']} engine, not a {e.role} engine")
        e.ns, e.vocab = Namespace(**info["namespace"]), info["vocab"]

    async def _probe(self) -> None:
        assert self.session is not None
        while True:
            await asyncio.sleep(1.0)
            for e in [e for e in self.engines if not e.healthy]:
                try:
                    async with self.session.get(f"{e.url}/healthz") as resp:
                        e.healthy = resp.status == 200
                except (aiohttp.ClientError, OSError):
                    pass

    def _pick(self, role: str, prompt: list[int]) -> tuple[EngineRef, list[BlockKey], int]:
        return choose(self.engines, role, prompt, self.pool)

    async def trace(self, request: web.Request) -> web.Response:
        """The spans this router kept of one request (``kvpool trace --router``)."""
        request_id = tracing.checked(request.match_info["request_id"])
        return web.json_response({"request_id": request_id, "where": "router",
                                  "spans": [s.to_json() for s in self.spans.get(request_id)]})

    async def healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"ok": True, "mode": self.mode})

    async def list(self, _: web.Request) -> web.Response:
        return web.json_response({"mode": self.mode, "engines": [
            {"url": e.url, "role": e.role, "healthy": e.healthy, "running": e.running,
             "cached_blocks": len(e.pages)} for e in self.engines], "pool_blocks": len(self.pool)})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await read_json(request)
            if "token_ids" not in body:
                if not isinstance(body.get("prompt"), str):
                    raise BadRequest("send 'prompt' (text) or 'token_ids' (a list of ints)")
                body["token_ids"] = tokenizer.encode(body.pop("prompt"))
            # The request's id: the caller's, else its traceparent's trace id, else a new one;
            # every engine and pool call made for it carries it.
            rid = body.get("request_id") or tracing.from_traceparent(request.headers.get("traceparent"))
            body["request_id"] = tracing.checked(rid) if rid else uuid.uuid4().hex
        except KVPoolError as exc:
            return error_response(exc)
        resp = web.StreamResponse(headers={"Content-Type": NDJSON, "X-Request-Id": body["request_id"]})
        await resp.prepare(request)
        stats: dict[str, Any] = {"prompt_tokens": len(body["token_ids"])}
        start = time.perf_counter()
        times: list[float] = []

        async def emit(token: int) -> None:
            times.append(time.perf_counter() - start)
            await resp.write(line({"token": token, "text": tokenizer.decode([token])}))

        stats["request_id"] = body["request_id"]
        try:
            with tracing.use(body["request_id"]), self.spans.timed("route", detail=self.mode):
                if self.mode == "mono":
                    await self._mono(body, stats, emit)
                else:
                    await self._disagg(body, stats, emit)
        except KVPoolError as exc:
            await resp.write(line({"error": exc.code, "message": str(exc)}))
        else:
            gaps = [b - a for a, b in zip(times, times[1:])]
            await resp.write(line({"done": True, **stats, "generated": len(times),
                                   "ttft_ms": times[0] * 1e3 if times else None,
                                   "tpot_ms": 1e3 * sum(gaps) / len(gaps) if gaps else None}))
        await resp.write_eof()
        return resp

    async def _disagg(self, body: dict[str, Any], stats: dict[str, Any], emit: Any) -> None:
        assert self.session is not None
        prompt = body["token_ids"]
        p, keys, _ = self._pick("prefill", prompt)
        stats["prefill"] = p.url
        p.running += 1
        p.running_tokens += len(prompt)
        handoff: dict[str, Any] | None = None
        with self.spans.timed("prefill", detail=p.url):
            try:  # the first token streams to the client while the prompt's blocks are written
                async with self.session.post(f"{p.url}/v1/prefill", json={**body, "stream": True},
                                             headers=_trace_headers(body)) as r:
                    if r.status != 200:
                        raise _engine_error(p, await r.json())
                    async for raw in r.content:
                        msg = json.loads(raw)
                        if "first_token" in msg:
                            await emit(msg["first_token"])
                        elif "handoff" in msg:
                            handoff = msg["handoff"]
                        elif "error" in msg:
                            raise _engine_error(p, msg)
            except (aiohttp.ClientError, OSError, json.JSONDecodeError) as exc:
                p.healthy = False
                raise Unavailable(f"prefill engine {p.url} failed ({exc}); retry the request") from None
            finally:
                p.running -= 1
                p.running_tokens -= len(prompt)
        if handoff is None:
            p.healthy = False
            raise Unavailable(f"prefill engine {p.url} closed the stream without a handoff; retry")
        stats["reused_tokens"], stats["pool_tokens"] = handoff["reused_tokens"], handoff["pool_tokens"]
        if handoff["max_tokens"] <= 1:
            return
        d, _, _ = self._pick("decode", prompt)
        stats["decode"] = d.url
        with self.spans.timed("decode", detail=d.url):
            await self._relay(d, "/v1/decode", handoff, stats, emit)

    async def _mono(self, body: dict[str, Any], stats: dict[str, Any], emit: Any) -> None:
        m, keys, _ = self._pick("mono", body["token_ids"])
        stats["mono"] = m.url
        n = len(body["token_ids"])
        m.running_tokens += n

        def prefilled() -> None:  # the prompt no longer weighs on the engine's queue
            m.running_tokens -= n

        with self.spans.timed("generate", detail=m.url):
            await self._relay(m, "/v1/generate", body, stats, emit, first=prefilled)

    async def _relay(self, e: EngineRef, path: str, body: dict[str, Any], stats: dict[str, Any],
                     emit: Any, first: Any = None) -> None:
        """Forward an engine's token stream; an engine that dies mid-stream fails this request
        alone, with a message that says what happened."""
        assert self.session is not None
        e.running += 1
        got, done = 0, False
        try:
            async with self.session.post(f"{e.url}{path}", json=body, headers=_trace_headers(body)) as r:
                if r.status != 200:
                    raise _engine_error(e, await r.json())
                async for raw in r.content:
                    msg = json.loads(raw)
                    if "token" in msg:
                        if got == 0 and first is not None:
                            first()
                            first = None
                        got += 1
                        await emit(msg["token"])
                    elif "error" in msg:
                        raise _engine_error(e, msg)
                    elif msg.get("done"):
                        stats.setdefault("reused_tokens", msg["reused_tokens"])
                        stats.setdefault("pool_tokens", msg["pool_tokens"])
                        if e.role == "decode":
                            stats["decode_fetched_blocks"] = msg["fetched_blocks"]
                            stats["decode_partial_fetched"] = msg["partial_fetched"]
                        done = True
        except (aiohttp.ClientError, OSError, json.JSONDecodeError) as exc:
            e.healthy = False
            raise Unavailable(f"{e.role} engine {e.url} failed after {got} streamed token(s): "
                              f"{type(exc).__name__}: {exc}; this request is lost, retry it "
                              "(the pool and other requests are unaffected)") from None
        finally:
            e.running -= 1
            if first is not None:
                first()
        if not done:
            e.healthy = False
            raise Unavailable(f"{e.role} engine {e.url} closed the stream after {got} token(s) "
                              "without finishing; retry the request")


def prompt_cost(e: EngineRef, keys: list[BlockKey], prompt_tokens: int, pool: BlockView | None
                ) -> tuple[float, int]:
    """Tokens' worth of work before the first token on ``e``, and its own cached blocks:
    its own pages are free, the pool's blocks that follow cost LOAD_COST of computing them,
    the rest is computed."""
    assert e.ns is not None
    bt = e.ns.block_tokens
    own = e.overlap(keys)
    cost, n = 0.0, own
    while pool is not None and n < len(keys):
        load = pool.load_cost(keys[n])
        if load is None:
            break
        cost += load * bt
        n += 1
    return cost + prompt_tokens - n * bt, own


def choose(engines: list[EngineRef], role: str, prompt: list[int], pool: BlockView | None = None
           ) -> tuple[EngineRef, list[BlockKey], int]:
    """The healthy engine of ``role`` with the least work before this prompt's first token
    (prefill, mono: tokens queued plus what the prompt costs there; decode: running
    requests). Returns it, the prompt's keys in its namespace, and its own cached blocks
    of them."""
    best: tuple[float, int, EngineRef, list[BlockKey], int] | None = None
    for e in engines:
        if e.role != role or not e.healthy:
            continue
        assert e.ns is not None
        if role == "decode":
            keys, hit, cost = [], 0, float(e.running)
        else:
            keys = block_keys(e.ns, prompt)
            work, hit = prompt_cost(e, keys, len(prompt), pool)
            cost = e.running_tokens + work
        if best is None or (cost, e.running) < best[:2]:
            best = (cost, e.running, e, keys, hit)
    if best is None:
        raise Unavailable(f"no healthy {role} engine; start one or wait for it to recover")
    return best[2], best[3], best[4]


def _trace_headers(body: dict[str, Any]) -> dict[str, str]:
    """W3C trace context for an engine call, so engines that read only headers follow too."""
    rid = body.get("request_id")
    return {"traceparent": tracing.traceparent(rid)} if isinstance(rid, str) else {}


def _engine_error(e: EngineRef, body: dict[str, Any]) -> KVPoolError:
    return error_from_code(body.get("error", "internal"),
                           f"{e.role} engine {e.url}: {body.get('message', body)}")


async def run_router(args: argparse.Namespace) -> None:
    router = await Router(args.prefill, args.decode, args.mono, args.pool,
                          secret(args.pool_token, "--pool-token")).start()
    try:
        await serve(router.app, args.host, args.port, {"role": "router", "mode": router.mode})
    finally:
        await router.stop()
