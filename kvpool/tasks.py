"""An owner for background tasks that live as long as a server object, not one block.

``asyncio.TaskGroup`` fits work that one ``async with`` encloses; a server that starts in
one call and stops in another needs the same promise across the two: every task it
spawns is kept (never collected mid-flight), a failure is logged when it happens (not
lost until the task is collected), and stopping ends each one, cancelled or awaited.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Coroutine, TypeVar

import uvloop

log = logging.getLogger(__name__)
T = TypeVar("T")


class TaskOwner:
    """The tasks of one owner (``name`` says whose in the log)."""

    __slots__ = ("name", "_tasks", "_closed")

    def __init__(self, name: str) -> None:
        self.name = name
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._tasks)

    def spawn(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        """Run ``coro`` in the background until it ends or the owner stops."""
        if self._closed:
            coro.close()
            raise RuntimeError(f"{self.name} has stopped; it starts no new task")
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("%s: background task %s failed", self.name, task.get_name(),
                      exc_info=task.exception())

    async def any_done(self) -> None:
        """Wait until one of the tasks running now ends (at once when none runs)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), return_when=asyncio.FIRST_COMPLETED)

    async def drain(self) -> None:
        """Wait for every task to end on its own, those they spawn meanwhile too; then
        spawn no more."""
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self._closed = True

    async def cancel(self) -> None:
        """Cancel every task and wait until each has ended; spawn no more."""
        self._closed = True
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """The event loop of every process and thread kvpool runs (but the blocking client,
    clients.sync, which starts its loop for each call): uvloop's, which takes about 40%
    off each RPC's cost against asyncio's own (scripts/bench_ops.py: 6.7 k against 4.1 k
    exists/s from one client)."""
    return uvloop.new_event_loop()


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on kvpool's event loop (``new_event_loop``)."""
    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        return runner.run(main)
