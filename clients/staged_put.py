"""A put between its reservation and its commit: parts written in order, hashed while
they move, then one commit of the headers (``AsyncPoolClient.begin_put``)."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

from kvpool.codec import BlockHeader
from kvpool.errors import BadRequest, KVPoolError, NodeGone, ReservationLost
from kvpool.keys import BlockKey, Namespace
from kvpool.protocol import Call, Reservation, ReserveStatus
from clients.buffers import BufferView
from clients.segments import SegmentedView, StreamHash, view_of

# How a staged put reaches the pool, given by the client that opened it: a call to the
# master, and the write of parts (new block indices, views, reservations, a hash run while
# the bytes move, offset) into the reserved arena blocks.
CallMaster = Callable[[Call, dict[str, Any]], Awaitable[Any]]
WriteParts = Callable[[list[int], list[Any], list[Reservation], Callable[[], None], int], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class PutResult:
    key: BlockKey
    stored: bool  # False: the key already existed (or another writer is storing it)
    replicas: int = 1  # copies on distinct nodes (a put asking for more gets as many as fit)
    tier: str = ""  # where a new block went: "gpu" or "host" (hot tiers take new blocks)


class PutState(enum.Enum):
    OPEN = "open"  # reserved; parts are being written
    COMMITTED = "committed"
    ABORTED = "aborted"


class StagedPut:
    """A put between its reservation and its commit (``AsyncPoolClient.begin_put``).

    Each ``write`` moves one part of every new block (the same byte range of each, in
    order from offset 0) and hashes it while it moves, so that ``commit`` only sends the
    headers; ``abort`` hands the reservation back. Blocks another writer already stores
    are not written (``new`` lists the ones that are). Not safe for concurrent writes:
    parts go in order, one at a time."""

    __slots__ = ("_call", "_write", "put_id", "keys", "items", "sizes", "layout", "_headers",
                 "new", "_done", "_hashes", "state", "until")

    def __init__(self, call: CallMaster, write: WriteParts, put_id: int, keys: list[BlockKey],
                 items: list[Reservation], sizes: list[int], layout: str,
                 headers: list[BlockHeader], until: float = 0.0) -> None:
        self._call, self._write = call, write
        self.put_id, self.keys, self.items, self.sizes = put_id, keys, items, sizes
        self.layout, self._headers = layout, headers
        self.new = [i for i, item in enumerate(items) if item.status is ReserveStatus.NEW]
        self._done = {i: 0 for i in self.new}  # bytes written of each new block
        self._hashes = {i: StreamHash() for i in self.new}
        self.state = PutState.OPEN
        self.until = until  # loop time after which no write may start (0: no limit)

    def _check(self, want: PutState = PutState.OPEN) -> None:
        if self.state is not want:
            raise BadRequest(f"put {self.put_id} is {self.state.value}, not {want.value}")

    async def write(self, parts: Sequence[Any], offset: int) -> None:
        """Write ``parts[i]`` (a buffer, a view or ``Segments``) at ``offset`` of block i,
        for every new block i (the other entries are not read). A failed write aborts
        the put and raises."""
        self._check()
        if len(parts) != len(self.keys):
            raise BadRequest(f"{len(parts)} parts for {len(self.keys)} blocks")
        views: list[Any] = [None] * len(parts)
        for i in self.new:
            v = parts[i] if isinstance(parts[i], (BufferView, SegmentedView)) else view_of(parts[i], False)
            if self._done[i] != offset:
                raise BadRequest(f"block {self.keys[i].hex()} has {self._done[i]} bytes written; "
                                 f"the next part goes there, not at {offset}")
            views[i] = v

        def hash_parts() -> None:  # while the bytes are on their way
            for i in self.new:
                self._hashes[i].update(views[i])

        if self.until and asyncio.get_running_loop().time() > self.until:
            await self.abort()  # its space may be another block's by now: write nothing
            raise ReservationLost(f"put {self.put_id & 0xFFFFFFFF} outlived its reservation "
                                  "before its bytes were written (was this process paused?); "
                                  "nothing was written, put again")
        try:
            await self._write(self.new, views, self.items, hash_parts, offset)
        except BaseException:
            await self.abort()
            raise
        for i in self.new:
            self._done[i] += views[i].nbytes

    async def commit(self) -> list[PutResult]:
        """Make the new blocks visible, every byte of each written and its checksum in
        its header."""
        self._check()
        short = [i for i in self.new if self._done[i] != self.sizes[i]]
        if short:
            await self.abort()
            i = short[0]
            raise BadRequest(f"{len(short)} blocks are not fully written (block "
                             f"{self.keys[i].hex()}: {self._done[i]} of {self.sizes[i]} bytes); "
                             "the put was aborted")
        if self.new:
            headers = [dataclasses.replace(self._headers[i], checksum=self._hashes[i].digest())
                       for i in self.new]
            done = await self._call(Call.COMMIT, {
                "put_id": self.put_id, "keys": [self.keys[i] for i in self.new],
                "headers": [h.encode() for h in headers]})
            if done["committed"] != len(self.new):
                self.state = PutState.ABORTED
                raise NodeGone(f"only {done['committed']} of {len(self.new)} blocks were committed: "
                               "their node left during the put; retry")
        self.state = PutState.COMMITTED
        return [PutResult(k, item.status is ReserveStatus.NEW, item.replicas,
                          tier_of(item.locations[0].mem_type) if item.locations else "")
                for k, item in zip(self.keys, self.items)]

    async def abort(self) -> None:
        """Hand the reservation back (best effort: the master reclaims it on its deadline)."""
        if self.state is not PutState.OPEN:
            return
        self.state = PutState.ABORTED
        if self.new:
            try:
                await self._call(Call.ABORT, {"put_id": self.put_id,
                                                      "keys": [self.keys[i] for i in self.new]})
            except KVPoolError:
                pass


def tier_of(mem_type: str) -> str:
    """The tier a location's memory type names: GPU memory or the host arena."""
    return "gpu" if mem_type == "VRAM" else "host"


def put_meta(ns: Namespace | None, token_ids: Sequence[Sequence[int]] | None, n: int
             ) -> dict[str, Any] | None:
    """What a reserve call says about its blocks beyond their bytes (master/catalog.py)."""
    meta: dict[str, Any] = {}
    if ns is not None:
        meta.update(namespace=ns.root(), model=ns.model_id, block_tokens=ns.block_tokens)
    if token_ids is not None:
        if len(token_ids) != n:
            raise BadRequest(f"{n} keys but {len(token_ids)} token id lists")
        meta["token_ids"] = [[int(t) for t in row] for row in token_ids]
    return meta or None
