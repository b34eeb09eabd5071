"""The one Tier protocol every storage tier implements, and its boundary types.

Arenas (gpu, host) hold raw payloads at offsets the master allocates; clients write and
read them through NIXL, so the arena only learns of a block when the master commits it
(``adopt``). Cold tiers (ssd, object) store self-describing blobs and verify the checksum
on every read, dropping a block that fails it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from kvpool.codec import BlockHeader
from kvpool.keys import BlockKey


class TierKind(str, enum.Enum):
    GPU = "gpu"
    HOST = "host"
    SSD = "ssd"
    OBJECT = "object"

    @property
    def rank(self) -> int:
        """0 is fastest; demotion goes to rank + 1."""
        return _RANK[self]

    @property
    def is_arena(self) -> bool:
        return self in (TierKind.GPU, TierKind.HOST)


_RANK = {TierKind.GPU: 0, TierKind.HOST: 1, TierKind.SSD: 2, TierKind.OBJECT: 3}
TIER_ORDER = sorted(TierKind, key=lambda t: t.rank)


@dataclass(frozen=True, slots=True)
class StoredBlock:
    """One committed block as its tier knows it: the daemon's inventory is a list of these."""

    key: BlockKey
    header: BlockHeader
    location: int  # byte offset in an arena; 0 in cold tiers
    size: int  # bytes the block occupies in the tier


@dataclass(frozen=True, slots=True)
class TierInfo:
    kind: TierKind
    capacity: int
    used: int
    blocks: int


@runtime_checkable
class Tier(Protocol):
    kind: TierKind
    capacity: int

    def used(self) -> int:
        """Bytes occupied by committed blocks."""

    def __len__(self) -> int:
        """Number of committed blocks."""

    def contains(self, key: BlockKey) -> bool: ...

    def inventory(self) -> list[StoredBlock]:
        """Every committed block, complete at every moment."""

    async def write(self, key: BlockKey, header: BlockHeader, payload: bytes | memoryview,
                    location: int = 0) -> StoredBlock:
        """Store a block. Arenas copy to ``location``; cold tiers encode and persist.
        Writing a key already present replaces nothing and returns the stored block.
        Raises TierFull when there is no room, BadRequest when the payload does not fit."""

    async def read(self, key: BlockKey) -> tuple[BlockHeader, bytes | memoryview]:
        """Header and raw payload. Raises BlockNotFound; cold tiers verify and raise
        ChecksumMismatch after dropping the corrupt block."""

    async def remove(self, key: BlockKey) -> bool:
        """Forget a block; False when it was not there."""

    def check(self) -> None:
        """Raise AssertionError when an internal invariant is broken (tests call it)."""

    async def close(self) -> None: ...
