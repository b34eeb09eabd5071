"""The pool client as the connector uses it: its own event loop on a thread (vLLM's
scheduler and worker are synchronous), every wait bounded, and a health state so that a
pool that is down costs one warning and no waiting until it is tried again."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from typing import Any, Awaitable, Callable, TypeVar

from clients.client import AsyncPoolClient
from engine.vllm_kv.common import ConnectorConfig
from kvpool.config import ClientConfig
from kvpool.errors import KVPoolError, Unavailable
from kvpool.tasks import new_event_loop

log = logging.getLogger("vllm.kvpool." + __name__.rsplit(".", 1)[-1])  # under vLLM's handler
T = TypeVar("T")
# What a pool that is down, slow or gone looks like from here.
POOL_FAILURES = (KVPoolError, TimeoutError, asyncio.TimeoutError, OSError,
                 concurrent.futures.TimeoutError)


class PoolLink:
    def __init__(self, cfg: ConnectorConfig, name: str) -> None:
        self.cfg = cfg
        self.name = name
        self._loop = new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"kvpool-{name}",
                                        daemon=True)
        self._thread.start()
        ccfg = ClientConfig(master_url=cfg.master_url, etcd=cfg.etcd, cluster=cfg.cluster,
                            token=cfg.token, tls_ca=cfg.tls_ca, host=cfg.host,
                            namespace=cfg.namespace,
                            timeout_s=cfg.timeout_s, transfer_timeout_s=cfg.transfer_timeout_s)
        self.client: AsyncPoolClient = self.run(self._make(ccfg), 30.0)
        self._down_until = 0.0
        self._warned = False

    async def _make(self, ccfg: ClientConfig) -> AsyncPoolClient:
        return AsyncPoolClient(ccfg, name=f"vllm-{self.name}")

    # -- health ---------------------------------------------------------------------------

    def available(self) -> bool:
        """False for ``retry_s`` after a failure: vLLM then runs as if there were no pool."""
        return time.monotonic() >= self._down_until

    def failed(self, what: str, exc: BaseException) -> None:
        self._down_until = time.monotonic() + self.cfg.retry_s
        if not self._warned:
            self._warned = True
            log.warning("kvpool: %s failed (%s: %s); serving without the pool, retrying in %.0f s",
                        what, type(exc).__name__, exc, self.cfg.retry_s)
        else:
            log.debug("kvpool: %s failed again: %s", what, exc)

    def succeeded(self) -> None:
        if self._warned:
            self._warned = False
            log.warning("kvpool: the pool answers again; using it")

    # -- calls ----------------------------------------------------------------------------

    def submit(self, coro: Awaitable[T], timeout_s: float) -> "concurrent.futures.Future[T]":
        """Run ``coro`` on the link's loop with a deadline; the future never outlives it."""
        return asyncio.run_coroutine_threadsafe(_bounded(coro, timeout_s), self._loop)

    def run(self, coro: Awaitable[T], timeout_s: float) -> T:
        """Run ``coro`` to completion, blocking; Unavailable past the deadline."""
        fut = self.submit(coro, timeout_s)
        try:
            return fut.result(timeout_s + 1.0)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise Unavailable(f"the pool did not answer within {timeout_s:.1f} s") from None

    def call_soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the link's loop, soon; returns at once."""
        self._loop.call_soon_threadsafe(fn, *args)

    def connect_ahead(self) -> None:
        """Connect to the master and every daemon in the background, so that the first
        request's loads and saves do not pay for it; a failure is only logged (calls then
        connect as they go)."""
        fut = self.submit(self.client.connect(), self.cfg.timeout_s)
        fut.add_done_callback(lambda f: f.cancelled() or f.exception() is None or log.info(
            "kvpool: could not connect ahead (%s); connecting at the first call", f.exception()))

    def register(self, buffer: Any) -> None:
        async def reg() -> None:
            self.client.register(buffer)

        self.run(reg(), 60.0)

    def close(self) -> None:
        if not self._loop.is_running():
            return
        try:
            self.run(self.client.close(), 5.0)
        except POOL_FAILURES as exc:
            log.debug("closing the pool client: %s", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)


async def _bounded(coro: Awaitable[T], timeout_s: float) -> T:
    try:
        return await asyncio.wait_for(coro, timeout_s)
    except asyncio.TimeoutError:
        raise Unavailable(f"the pool did not answer within {timeout_s:.1f} s") from None
