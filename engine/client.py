"""Calling the engines: a router request with its streamed tokens and timings, as a
dataclass; and the first token of a prompt straight from a prefill engine."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from kvpool.errors import Unavailable, error_from_code


@dataclass
class Generation:
    tokens: list[int] = field(default_factory=list)
    token_times: list[float] = field(default_factory=list)  # seconds since the request was sent
    done: dict[str, Any] | None = None  # the router's closing line: reuse, TTFT, TPOT, engines
    error: str | None = None  # the message of the error that ended the request
    error_code: str | None = None  # its code in kvpool.errors (e.g. cache_full)

    @property
    def ttft_ms(self) -> float:
        return self.token_times[0] * 1e3 if self.token_times else float("nan")

    @property
    def tpot_ms(self) -> list[float]:
        t = self.token_times
        return [(b - a) * 1e3 for a, b in zip(t, t[1:])]


async def generate(session: aiohttp.ClientSession, router_url: str, body: dict[str, Any]) -> Generation:
    """POST /v1/generate and read its NDJSON stream to the end."""
    out = Generation()
    start = time.perf_counter()
    async with session.post(f"{router_url}/v1/generate", json=body) as resp:
        if resp.status != 200:
            body = await resp.json()
            out.error = body.get("message", f"HTTP {resp.status}")
            out.error_code = body.get("error", "internal")
            return out
        async for raw in resp.content:
            msg = json.loads(raw)
            if "token" in msg:
                out.tokens.append(msg["token"])
                out.token_times.append(time.perf_counter() - start)
            elif "error" in msg:
                out.error, out.error_code = msg["message"], msg["error"]
            elif msg.get("done"):
                out.done = msg
    return out


async def first_token(session: aiohttp.ClientSession, prefill_url: str, prompt: list[int]
                      ) -> tuple[float, dict[str, Any]]:
    """Milliseconds until a prefill engine streams a prompt's first token (TTFT without a
    router or a decode engine), and the handoff that follows once the prompt's blocks are
    committed to the pool."""
    start = time.perf_counter()
    ttft, handoff = float("nan"), None
    async with session.post(f"{prefill_url}/v1/prefill",
                            json={"token_ids": prompt, "max_tokens": 1, "stream": True}) as resp:
        async for raw in resp.content:
            msg = json.loads(raw)
            if "first_token" in msg:
                ttft = (time.perf_counter() - start) * 1e3
            elif "handoff" in msg:
                handoff = msg["handoff"]
            else:  # the engine's error line, typed by its code
                raise error_from_code(msg.get("error", "internal"),
                                      f"{prefill_url}: {msg.get('message', msg)}")
    if handoff is None:
        raise Unavailable(f"{prefill_url} closed the stream without a handoff")
    return ttft, handoff
