"""The blocking face of AsyncPoolClient, generated from it: one event loop in a thread."""

from __future__ import annotations

import asyncio
import functools
import inspect
import threading
from typing import Any, Callable

from kvpool.config import ClientConfig
from clients.client import AsyncPoolClient


class PoolClient:
    """Same calls as AsyncPoolClient, blocking; safe to share between threads."""

    def __init__(self, cfg: ClientConfig | None = None, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvpool-client",
                                        daemon=True)
        self._thread.start()
        self._async = self._run(_make(cfg, kwargs))

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def register(self, buffer: Any) -> None:
        self._run(_call_sync(self._async.register, buffer))

    def close(self) -> None:
        if self._loop.is_running():
            self._run(self._async.close())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
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
