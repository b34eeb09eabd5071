"""The blocking face of AsyncPoolClient, generated from it: the caller's thread runs its loop.

Why not a loop in a thread of its own: handing each call to another thread and its answer
back costs two thread wake-ups, measured at about 105 us a call here against about 30 us
for running the loop on the caller's thread (scripts/bench_ops.py reports the sync
client's exists beside the async one's). So each call runs the client's event loop on
the calling thread until the call is done; calls from several threads take turns. Between
calls nothing runs, so the read leases a call leaves to release are sent before it
returns, one way (no answer is awaited: the stream RPC's ``notify``).

That loop is asyncio's own, where every other loop kvpool owns is uvloop's: started and
stopped for every call, uvloop costs 30 us a start against asyncio's 10, more than it
saves on the call (an exists took 115-141 us on asyncio's against 169-175 on uvloop's,
a hot get 71-91 against 126-181).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from kvpool.config import ClientConfig
from clients.client import AsyncPoolClient


class PoolClient:
    """Same calls as AsyncPoolClient, blocking; safe to share between threads."""

    def __init__(self, cfg: ClientConfig | None = None, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._turn = threading.Lock()
        self._async = self._run(_make(cfg, kwargs))

    def _run(self, coro: Any) -> Any:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return self._drive(coro)
        # Called from inside a running event loop (which it blocks meanwhile; better to
        # await AsyncPoolClient there): this thread cannot run a second loop, a helper can.
        with ThreadPoolExecutor(1, thread_name_prefix="kvpool-client") as helper:
            return helper.submit(self._drive, coro).result()

    def _drive(self, coro: Any) -> Any:
        with self._turn:
            try:
                return self._loop.run_until_complete(coro)
            finally:
                client = getattr(self, "_async", None)
                if client is not None and not self._loop.is_closed():
                    send = client.release_now()
                    if send is not None:
                        self._loop.run_until_complete(send)

    def register(self, buffer: Any) -> None:
        self._run(_call_sync(self._async.register, buffer))

    def close(self) -> None:
        if not self._loop.is_closed():
            self._run(self._async.close())
            with self._turn:
                self._loop.close()

    def __enter__(self) -> "PoolClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def _make(cfg: ClientConfig | None, kwargs: dict[str, Any]) -> AsyncPoolClient:
    return AsyncPoolClient(cfg, **kwargs)


async def _call_sync(fn: Callable[..., Any], *args: Any) -> Any:
    return fn(*args)


def _blocking(name: str) -> Callable[..., Any]:
    method = getattr(AsyncPoolClient, name)

    @functools.wraps(method)
    def call(self: PoolClient, *args: Any, **kwargs: Any) -> Any:
        return self._run(getattr(self._async, name)(*args, **kwargs))

    return call


for _name, _fn in inspect.getmembers(AsyncPoolClient, inspect.iscoroutinefunction):
    if not _name.startswith("_") and _name not in ("close",):
        setattr(PoolClient, _name, _blocking(_name))
