"""Engine processes: ``python -m engine.serve prefill|decode|mono|router [options]``.

Each prints one JSON line with its URL once it listens (port 0 picks a free one), serves
HTTP on aiohttp, and stops on SIGINT or SIGTERM after its writes to the pool have landed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import logging
import sys
from typing import Any

import torch
from aiohttp import web

from clients.client import AsyncPoolClient
from engine.config import PRESETS, EngineConfig
from engine.http import NDJSON, error_response, line, read_json, serve
from engine.model import Transformer
from engine.worker import Handoff, Request, Role, Sequence, Worker
from kvpool import event_stream, logs, tracing
from kvpool.errors import BadRequest, KVPoolError
from kvpool.tasks import run as run_loop

log = logging.getLogger(__name__)


class EngineServer:
    """HTTP face of one Worker."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.app = web.Application(middlewares=[self._errors])
        self.app.add_routes([
            web.get("/healthz", self.healthz),
            web.get("/v1/info", self.info),
            web.get("/v1/events", self.events),
            web.post("/v1/prefill", self.prefill),
            web.post("/v1/decode", self.decode),
            web.post("/v1/generate", self.generate),
        ])
        event_stream.end_on_shutdown(self.app, worker.cache.events)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except KVPoolError as exc:
            return error_response(exc)

    async def healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def info(self, _: web.Request) -> web.Response:
        w = self.worker
        return web.json_response({
            "role": w.role.value, "model_id": w.model.model_id, "vocab": w.model.cfg.vocab,
            "namespace": {k: v for k, v in dataclasses.asdict(w.ns).items() if k != "secret"},
            "num_pages": w.cache.num_pages, "load": w.load(), "totals": w.totals})

    async def events(self, request: web.Request) -> web.StreamResponse:
        """This engine's own KV pages as KV events, in the pool's schema (what a router
        weighs above the pool's blocks)."""
        return await event_stream.stream(request, self.worker.cache.events)

    async def prefill(self, request: web.Request) -> web.StreamResponse:
        """The handoff as JSON; with ``"stream": true``, NDJSON: the first token as soon as
        it is known, then the handoff once the prompt's blocks are committed."""
        body = _traced(request, await read_json(request))
        seq = self.worker.prefill(Request.from_json(body, self.worker.model.cfg.vocab))
        assert seq.first is not None and seq.handoff is not None
        if not body.get("stream"):
            return web.json_response((await seq.handoff).to_json())
        resp = web.StreamResponse(headers={"Content-Type": NDJSON})
        await resp.prepare(request)
        try:
            await resp.write(line({"first_token": await seq.first}))
            await resp.write(line({"handoff": (await seq.handoff).to_json()}))
        except KVPoolError as exc:
            await resp.write(line({"error": exc.code, "message": str(exc)}))
        await resp.write_eof()
        return resp

    async def decode(self, request: web.Request) -> web.StreamResponse:
        seq = self.worker.decode(Handoff.from_json(await read_json(request)))
        return await self._stream(request, seq)

    async def generate(self, request: web.Request) -> web.StreamResponse:
        req = Request.from_json(_traced(request, await read_json(request)), self.worker.model.cfg.vocab)
        return await self._stream(request, self.worker.generate(req))

    async def _stream(self, request: web.Request, seq: Sequence) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": NDJSON})
        try:
            await resp.prepare(request)
            try:
                async for token in seq.stream():
                    await resp.write(line({"token": token}))
            except KVPoolError as exc:
                await resp.write(line({"error": exc.code, "message": str(exc)}))
            else:
                bt = self.worker.cfg.block_tokens
                await resp.write(line({"done": True, "reused_tokens": seq.cached * bt,
                                       "pool_tokens": seq.fetched * bt, "fetched_blocks": seq.fetched,
                                       "partial_fetched": seq.partial_fetched}))
            await resp.write_eof()
        except (ConnectionResetError, asyncio.CancelledError):
            self.worker.cancel(seq)  # the caller went away: free the sequence's pages
            raise
        return resp


def _traced(request: web.Request, body: dict[str, Any]) -> dict[str, Any]:
    """A request without its own ``request_id`` takes the trace id of its W3C
    ``traceparent`` header, so the pool calls made for it carry that id."""
    if not body.get("request_id"):
        trace = tracing.from_traceparent(request.headers.get("traceparent"))
        if trace is not None:
            body["request_id"] = trace
    return body


def load_model(args: argparse.Namespace) -> Transformer:
    if args.checkpoint:
        return Transformer.load(args.checkpoint)
    cfg = PRESETS[args.model]
    changes = {k: v for k, v in (("seed", args.seed), ("dtype", args.dtype)) if v is not None}
    return Transformer.random(dataclasses.replace(cfg, **changes))


async def run_engine(args: argparse.Namespace) -> None:
    role = Role(args.command)
    model = load_model(args)
    cfg = EngineConfig(block_tokens=args.block_tokens, num_pages=args.num_pages,
                       max_batch=args.max_batch, torch_threads=args.threads, salt=args.salt,
                       partial_block=args.partial_block)
    if role is not Role.MONO and not args.master:
        raise BadRequest(f"a {role.value} engine needs the pool: pass --master URL (see `kvpool up`)")
    pool = AsyncPoolClient(master_url=args.master, name=f"engine-{role.value}") if args.master else None
    if pool is not None:
        try:  # connected before the first request, not by it
            await pool.connect()
        except KVPoolError as exc:
            log.warning("the pool at %s does not answer yet (%s); connecting at the first call",
                        args.master, exc)
    worker = await Worker(role, model, cfg, pool).start()
    log.info("%s engine: model %s, %d pages of %d tokens (%.1f MiB)", role.value, model.model_id,
             cfg.num_pages, cfg.block_tokens, worker.cache.kv.nbytes / 2**20)
    try:
        await serve(EngineServer(worker).app, args.host, args.port,
                    {"role": role.value, "model_id": model.model_id})
    finally:
        await worker.stop()
        if pool is not None:
            await pool.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m engine.serve",
                                     description="reference engines and the router for kvpool")
    sub = parser.add_subparsers(dest="command", required=True)
    for role in ("prefill", "decode", "mono"):
        p = sub.add_parser(role, help=f"a {role} engine")
        p.add_argument("--master", help="pool master URL (optional for mono: without it, no pool)")
        p.add_argument("--model", choices=sorted(PRESETS), default="tiny", help="model size preset")
        p.add_argument("--seed", type=int, help="weights seed (default: the preset's)")
        p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
        p.add_argument("--checkpoint", help="load a checkpoint written by Transformer.save instead")
        p.add_argument("--block-tokens", type=int, default=EngineConfig.block_tokens)
        p.add_argument("--num-pages", type=int, default=EngineConfig.num_pages)
        p.add_argument("--max-batch", type=int, default=EngineConfig.max_batch)
        p.add_argument("--threads", type=int, default=EngineConfig.torch_threads)
        p.add_argument("--salt", default="")
        p.add_argument("--partial-block", choices=["fetch", "recompute"], default=EngineConfig.partial_block,
                       help="decode: fetch the trailing partial block (prefill writes it) or recompute it")
        p.add_argument("--host", default="127.0.0.1")
        p.add_argument("--port", type=int, default=0)
    r = sub.add_parser("router", help="route requests to prefill and decode (or mono) engines")
    r.add_argument("--prefill", action="append", default=[], help="prefill engine URL (repeatable)")
    r.add_argument("--decode", action="append", default=[], help="decode engine URL (repeatable)")
    r.add_argument("--mono", action="append", default=[], help="mono engine URL (repeatable)")
    r.add_argument("--pool", default="", help="the pool's master URL: follow its KV events to "
                   "weigh what engines would load from the pool (optional)")
    r.add_argument("--pool-token", default="", help="a viewer credential for --pool, or file:PATH")
    r.add_argument("--host", default="127.0.0.1")
    r.add_argument("--port", type=int, default=0)
    args = parser.parse_args(argv)
    logs.setup(logging.INFO)  # KVPOOL_LOG_FORMAT=json: one JSON object a line
    torch.set_num_threads(getattr(args, "threads", 1))
    try:
        if args.command == "router":
            from engine.router import run_router
            run_loop(run_router(args))
        else:
            run_loop(run_engine(args))
        return 0
    except KVPoolError as exc:
        print(f"engine {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
