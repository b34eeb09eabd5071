"""Read leases and pins: what keeps a replica where it is.

A get takes one lease over every block it returns; until the reader releases it (riding
on its next call) or it expires, no replica of those blocks moves, is evicted or is
overwritten. A pin keeps a block in the pool until it is unpinned (counted: two pins
need two unpins).
"""

from __future__ import annotations

import time
from typing import Sequence

from kvpool.errors import BlockNotFound
from kvpool.keys import BlockKey
from master.index import BlockEntry
from master.state import PoolState


class Leases:
    def __init__(self, state: PoolState) -> None:
        self.state = state
        self._held: dict[int, tuple[float, list[BlockKey]]] = {}  # lease -> expiry, keys

    def clear(self) -> None:
        self._held.clear()

    def grant(self, entries: Sequence[BlockEntry]) -> int:
        """One new lease over ``entries``; taken before any await, so nothing moves them."""
        lease = self.state.new_id()
        expiry = time.monotonic() + self.state.cfg.read_lease_s
        for entry in entries:
            entry.leases[lease] = expiry
        if entries:
            self._held[lease] = (expiry, [e.key for e in entries])
        return lease

    def release(self, lease_ids: Sequence[int]) -> None:
        index = self.state.index
        for lease in lease_ids:
            _, keys = self._held.pop(lease, (0.0, []))
            for key in keys:
                entry = index.get(key)
                if entry is not None:
                    entry.leases.pop(lease, None)

    def expire(self, now: float) -> None:
        self.release([lease for lease, (expiry, _) in self._held.items() if expiry <= now])

    @property
    def held(self) -> int:
        return len(self._held)

    def pin(self, keys: Sequence[BlockKey], delta: int) -> None:
        """Pin (+1) or unpin (-1) every key, or none of them if one is not stored."""
        entries = [self.state.index.readable(k) for k in keys]
        for key, entry in zip(keys, entries):
            if entry is None:
                raise BlockNotFound(f"no complete block {key.hex()}")
        for entry in entries:
            entry.pins = max(0, entry.pins + delta)  # type: ignore[union-attr]
