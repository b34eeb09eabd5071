"""A staged put's writes against its reservation's hold, with the master and the
transfers as in-process fakes."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from clients.staged_put import PutState, StagedPut
from kvpool.codec import BlockHeader, DType
from kvpool.errors import ReservationLost
from kvpool.protocol import Call, Location, Reservation, ReserveStatus


def staged(until: float) -> tuple[StagedPut, list[Any], list[Any]]:
    calls: list[Any] = []
    writes: list[Any] = []

    async def call(name: Call, body: dict[str, Any]) -> dict[str, Any]:
        calls.append(name)
        return {}

    async def write(idx, views, items, while_copying, offset=0) -> None:  # type: ignore[no-untyped-def]
        writes.append(idx)

    loc = Location("n1", "agent-n1", 1 << 40, 16, "DRAM", 0)
    put = StagedPut(call, write, 7, [b"k" * 16], [Reservation(ReserveStatus.NEW, 1, (loc,))], [16], "",
                    [BlockHeader(DType.UINT8, (16,), "", 16, 0)], until)
    return put, calls, writes


async def test_a_writer_past_its_reservation_s_hold_writes_nothing() -> None:
    """A client frozen (SIGSTOP) between its reserve and its write: the master may have
    reclaimed that space and given it to another block, so not a byte goes there."""
    now = asyncio.get_running_loop().time()
    put, calls, writes = staged(until=now - 0.1)
    with pytest.raises(ReservationLost):
        await put.write([np.zeros(16, np.uint8)], 0)
    assert writes == [] and calls == [Call.ABORT] and put.state is PutState.ABORTED
    put, calls, writes = staged(until=now + 60)  # within the hold: written
    await put.write([np.zeros(16, np.uint8)], 0)
    assert writes == [[0]]
