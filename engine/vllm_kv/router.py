"""kvpool's router in front of ``vllm serve`` instances, speaking the OpenAI API.

``/v1/completions`` and ``/v1/chat/completions``, streaming or not. Disaggregated: the
prefill instance (``kv_producer``) computes the prompt with ``max_tokens`` 1 and saves
its blocks to the pool (its answer comes once they are committed); then the decode
instance (``kv_consumer``) gets the original request, loads the prefix from the pool and
generates; its answer (an SSE stream or one JSON body) goes back as it is. Or mono
instances alone. Instances are picked with ``engine.router.choose``, the reference
engines' rule: cached prefix (the blocks this router sent each instance) and load. A
prefill instance that fails is skipped (the decode instance then computes the prompt
itself); an instance is retried once its ``/health`` answers.

    python -m engine.vllm_kv.router --prefill URL --decode URL [--block-tokens 32]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from typing import Any

import aiohttp
from aiohttp import web

from engine.router import EngineRef, choose
from engine.http import serve
from kvpool.errors import BadRequest, KVPoolError, Unavailable
from kvpool.keys import Namespace
from kvpool.tasks import run as run_loop

log = logging.getLogger(__name__)
_HOP = {"content-length", "transfer-encoding", "connection", "content-encoding"}


class OpenAIRouter:
    def __init__(self, prefill: list[str], decode: list[str], mono: list[str],
                 block_tokens: int = 32, recent_blocks: int = 65536) -> None:
        if mono and (prefill or decode):
            raise BadRequest("give the router either --mono instances or --prefill and --decode ones")
        if not mono and not (prefill and decode):
            raise BadRequest("the router needs a prefill and a decode instance, or --mono ones")
        self.mode = "mono" if mono else "disagg"
        # The router's own namespace: keys here only track what it sent to whom.
        ns = Namespace("openai-router", "any", "router", block_tokens=block_tokens)
        self.engines = [EngineRef(u.rstrip("/"), r, ns=ns, capacity=recent_blocks)
                        for r, urls in (("prefill", prefill), ("decode", decode), ("mono", mono))
                        for u in urls]
        self.session: aiohttp.ClientSession | None = None
        self._probe_task: asyncio.Task[None] | None = None
        self.app = web.Application()
        self.app.add_routes([web.get("/health", self.health), web.get("/healthz", self.health),
                             web.get("/v1/models", self.models),
                             web.post("/v1/completions", self.completions),
                             web.post("/v1/chat/completions", self.chat)])

    async def start(self) -> "OpenAIRouter":
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(
            total=None, sock_connect=5, sock_read=300))
        for e in self.engines:
            if not await self._healthy(e):
                raise Unavailable(f"vLLM instance {e.url} does not answer /health; start it first")
        self._probe_task = asyncio.create_task(self._probe())
        return self

    async def stop(self) -> None:
        if self._probe_task is not None:
            self._probe_task.cancel()
            await asyncio.gather(self._probe_task, return_exceptions=True)
        if self.session is not None:
            await self.session.close()

    async def _healthy(self, e: EngineRef) -> bool:
        assert self.session is not None
        try:
            async with self.session.get(f"{e.url}/health", timeout=aiohttp.ClientTimeout(total=3)) as r:
                return r.status == 200
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            return False

    async def _probe(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for e in [e for e in self.engines if not e.healthy]:
                e.healthy = await self._healthy(e)

    # -- endpoints ------------------------------------------------------------------------

    async def health(self, _: web.Request) -> web.Response:
        return web.json_response({"ok": True, "mode": self.mode, "engines": [
            {"url": e.url, "role": e.role, "healthy": e.healthy, "running": e.running}
            for e in self.engines]})

    async def models(self, _: web.Request) -> web.Response:
        assert self.session is not None
        e = next(e for e in self.engines if e.role in ("decode", "mono"))
        async with self.session.get(f"{e.url}/v1/models") as r:
            return web.json_response(await r.json(), status=r.status)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._route(request, "/v1/completions")

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._route(request, "/v1/chat/completions")

    async def _route(self, request: web.Request, path: str) -> web.StreamResponse:
        try:
            body = await request.json()
            if not isinstance(body, dict):
                raise ValueError
        except ValueError:
            return _error(400, "the body must be a JSON object")
        try:
            tokens = await self._tokens(body, path)
            if self.mode == "mono":
                m, keys, _ = choose(self.engines, "mono", tokens)
                try:
                    return await self._relay(request, m, path, body, len(tokens))
                finally:
                    m.remember(keys)
            await self._prefill(body, path, tokens)
            d, _, _ = choose(self.engines, "decode", tokens)
            return await self._relay(request, d, path, body, 0)
        except KVPoolError as exc:
            return _error(exc.http_status, str(exc))

    async def _tokens(self, body: dict[str, Any], path: str) -> list[int]:
        """The prompt's token ids, from a vLLM instance's /tokenize (the router has no
        tokenizer of its own); empty when none can say (the choice then ignores prefixes)."""
        assert self.session is not None
        if path.endswith("/completions") and not path.endswith("chat/completions"):
            prompt = body.get("prompt")
            if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
                return prompt
            req = {"model": body.get("model"), "prompt": prompt}
        else:
            req = {"model": body.get("model"), "messages": body.get("messages")}
        for e in self.engines:
            if not e.healthy:
                continue
            try:
                async with self.session.post(f"{e.url}/tokenize", json=req) as r:
                    if r.status == 200:
                        return list((await r.json())["tokens"])
                    if 400 <= r.status < 500:
                        raise BadRequest((await r.text())[:500])
            except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
                e.healthy = False
        return []

    async def _prefill(self, body: dict[str, Any], path: str, tokens: list[int]) -> None:
        """Have a prefill instance compute the prompt and save it to the pool; a failure
        only means that the decode instance computes the prompt itself."""
        assert self.session is not None
        try:
            p, keys, _ = choose(self.engines, "prefill", tokens)
        except Unavailable as exc:
            log.warning("no prefill instance (%s); decode computes the prompt", exc)
            return
        one = {k: v for k, v in body.items() if k not in ("stream", "stream_options", "n")}
        one.update({"max_tokens": 1, "stream": False})
        if "max_completion_tokens" in one:
            one["max_completion_tokens"] = 1
        p.running += 1
        p.running_tokens += len(tokens)
        try:
            async with self.session.post(f"{p.url}{path}", json=one) as r:
                await r.read()
                if r.status != 200:
                    log.warning("prefill instance %s answered %d; decode computes the prompt",
                                p.url, r.status)
                    return
            p.remember(keys)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            p.healthy = False
            log.warning("prefill instance %s failed (%s); decode computes the prompt", p.url, exc)
        finally:
            p.running -= 1
            p.running_tokens -= len(tokens)

    async def _relay(self, request: web.Request, e: EngineRef, path: str, body: dict[str, Any],
                     queued_tokens: int) -> web.StreamResponse:
        """Forward the request and its answer as they are, streamed when it streams."""
        assert self.session is not None
        e.running += 1
        e.running_tokens += queued_tokens
        try:
            async with self.session.post(f"{e.url}{path}", json=body) as r:
                resp = web.StreamResponse(status=r.status, headers={
                    k: v for k, v in r.headers.items() if k.lower() not in _HOP})
                await resp.prepare(request)
                async for chunk in r.content.iter_any():
                    await resp.write(chunk)
                await resp.write_eof()
                return resp
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            e.healthy = False
            raise Unavailable(f"{e.role} instance {e.url} failed ({type(exc).__name__}: {exc}); "
                              "retry the request") from None
        finally:
            e.running -= 1
            e.running_tokens -= queued_tokens


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": {"message": message, "code": status}}, status=status)


async def _main(args: argparse.Namespace) -> None:
    router = await OpenAIRouter(args.prefill, args.decode, args.mono, args.block_tokens).start()
    try:
        await serve(router.app, args.host, args.port, {"role": "router", "mode": router.mode})
    finally:
        await router.stop()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prefill", nargs="*", default=[])
    ap.add_argument("--decode", nargs="*", default=[])
    ap.add_argument("--mono", nargs="*", default=[])
    ap.add_argument("--block-tokens", type=int, default=32, help="vLLM's --block-size")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run_loop(_main(ap.parse_args(argv)))


if __name__ == "__main__":
    main()
