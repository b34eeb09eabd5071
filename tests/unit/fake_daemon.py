"""An in-process pool daemon behind the master's DaemonLink, for unit tests of the
master's logic: blocks are records in dicts, and faults (a corrupt replica, a full tier,
a daemon that stops answering, one that answers a call only when let go, one that has
fenced this master off) are switches."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Sequence

from kvpool.daemon_link import (ArenaRegion, CopyResult, Health, InventoryPage, InventoryRequest,
                                InventorySnapshots, PinMark, Registration, RegionMetadata,
                                StoredBlock, TierDescription)
from kvpool.errors import (BadRequest, BlockNotFound, ChecksumMismatch, NotLeader, TierFull,
                           Unavailable)
from kvpool.keys import BlockKey
from kvpool.tiers.base import TierKind


@dataclass
class FakeDaemon:
    node_id: str
    tiers: list[TierDescription]
    url: str = ""
    agent: str = ""
    held: dict[TierKind, dict[BlockKey, StoredBlock]] = field(default_factory=dict)
    corrupt: set[tuple[TierKind, BlockKey]] = field(default_factory=set)
    full: set[TierKind] = field(default_factory=set)
    down: bool = False
    deposed: bool = False  # a newer leader has been here: this master's calls are fenced off
    calls: list[str] = field(default_factory=list)
    marks: dict[BlockKey, PinMark] = field(default_factory=dict)
    layout: list[ArenaRegion] = field(default_factory=list)  # the regions it was told
    # Calls held up (as by a daemon frozen mid-call) until their event is set.
    hold: dict[str, asyncio.Event] = field(default_factory=dict)
    # Calls carried out whose answer is lost (a link cut just after): the caller sees
    # Unavailable, not knowing the daemon did it.
    lose_answers: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.url = self.url or f"fake://{self.node_id}"
        self.agent = self.agent or f"agent-{self.node_id}"
        for t in self.tiers:
            self.held.setdefault(t.kind, {})
        self.pages = InventorySnapshots(
            lambda: [b for blocks in self.held.values() for b in blocks.values()], list,
            lambda: self.marks)

    def _answer(self, name: str) -> None:
        self.calls.append(name)
        if self.down:
            raise Unavailable(f"{self.url} does not answer")
        if self.deposed:
            raise NotLeader(f"{name} from a master of an older leader generation: refused")

    async def _held(self, name: str) -> None:
        gate = self.hold.get(name)
        if gate is not None:
            await gate.wait()

    def _answered(self, name: str) -> None:
        if name in self.lose_answers:
            raise Unavailable(f"the connection to {self.url} closed before it answered {name}")

    def registration_now(self) -> Registration:
        return Registration(self.node_id, self.url, self.agent, b"meta", 5.0, self.tiers)

    async def adopt(self, blocks: Sequence[StoredBlock]) -> None:
        self._answer("adopt")
        await self._held("adopt")
        for b in blocks:  # an arena refuses a span another block's record holds
            for other in self.held[b.tier].values():
                if other.key != b.key and b.tier.is_arena and \
                        other.location < b.location + b.size and b.location < other.location + other.size:
                    raise BadRequest(f"[{b.location}, {b.location + b.size}) overlaps the block "
                                     f"at {other.location} in the {b.tier.value} arena")
        for b in blocks:
            self.held[b.tier][b.key] = b
        self._answered("adopt")

    async def copy(self, keys: Sequence[BlockKey], src: TierKind, dst: TierKind,
                   locations: Sequence[int]) -> list[CopyResult]:
        self._answer("copy")
        await self._held("copy")
        out = []
        for key, location in zip(keys, locations):
            block = self.held[src].get(key)
            if block is None:
                out.append(CopyResult(error=BlockNotFound(f"{key.hex()} is not in {src.value}")))
            elif (src, key) in self.corrupt:
                del self.held[src][key]
                out.append(CopyResult(error=ChecksumMismatch(f"{key.hex()} failed its checksum")))
            elif dst in self.full:
                out.append(CopyResult(error=TierFull(f"{dst.value} is full")))
            else:
                self.held[dst][key] = StoredBlock(key, dst, location, block.size, block.header)
                out.append(CopyResult(block.size))
        self._answered("copy")
        return out

    async def drop(self, tier: TierKind, keys: Sequence[BlockKey]) -> int:
        self._answer("drop")
        await self._held("drop")
        return sum(self.held[tier].pop(k, None) is not None for k in keys)

    async def mark(self, marks: Sequence[PinMark]) -> None:
        self._answer("mark")
        for m in marks:
            if m.empty:
                self.marks.pop(m.key, None)
            else:
                self.marks[m.key] = m

    async def inventory(self, req: InventoryRequest) -> InventoryPage:
        self._answer("inventory")
        await self._held("inventory")
        return self.pages.page(req)

    async def registration(self, rescan: bool = False) -> Registration:
        self._answer("registration")
        return self.registration_now()

    async def regions(self, regions: Sequence[ArenaRegion]) -> RegionMetadata:
        self._answer("regions")
        self.layout = list(regions)
        return RegionMetadata(b"meta", [f"meta:{r.tier.value}:{r.name}".encode() for r in regions])

    async def health(self) -> Health:
        self._answer("health")
        return Health(self.node_id, self.agent, {})

    async def close(self) -> None:
        pass
