"""The owner of a server's background tasks: it keeps them, stops them, and reports a
failure when it happens."""

from __future__ import annotations

import asyncio
import logging

import pytest

from kvpool.tasks import TaskOwner


async def test_cancel_ends_every_task_and_drain_awaits_them() -> None:
    owner = TaskOwner("test")
    forever = owner.spawn(asyncio.sleep(3600))
    await asyncio.sleep(0)
    assert len(owner) == 1
    await owner.cancel()
    assert forever.cancelled() and len(owner) == 0

    writes = TaskOwner("writes")
    landed: list[int] = []

    async def write(i: int) -> None:
        await asyncio.sleep(0.01 * i)
        if i == 0:  # a write that ends by starting another, as a chain of stores may
            writes.spawn(write(3))
        landed.append(i)

    for i in range(3):
        writes.spawn(write(i))
    await writes.drain()
    assert sorted(landed) == [0, 1, 2, 3] and len(writes) == 0
    with pytest.raises(RuntimeError, match="stopped"):
        writes.spawn(write(9))


async def test_any_done_returns_when_one_ends() -> None:
    owner = TaskOwner("test")
    await owner.any_done()  # nothing runs: no wait
    quick, slow = owner.spawn(asyncio.sleep(0.01)), owner.spawn(asyncio.sleep(3600))
    await asyncio.wait_for(owner.any_done(), 5)
    assert quick.done() and not slow.done()
    await owner.cancel()


async def test_a_failure_is_logged_at_once(caplog: pytest.LogCaptureFixture) -> None:
    owner = TaskOwner("engine-test")

    async def fail() -> None:
        raise ValueError("disk on fire")

    task = owner.spawn(fail(), name="store")
    with caplog.at_level(logging.ERROR, logger="kvpool.tasks"):
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0)  # done callbacks run on the next turn of the loop
    assert "engine-test: background task store failed" in caplog.text
    assert "disk on fire" in caplog.text and len(owner) == 0
