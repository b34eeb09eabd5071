"""Read grants a client keeps while their leases last, so a hot block costs a copy, not a call.

Blocks are immutable and a read lease pins a replica where it is, so the location and
header a get was granted stay right until the lease ends: a later get of the same key may
read them again without asking the master. Only single-key gets of a key read before
(recently) are kept, at most ``capacity`` of them, each for as long as the master allows
(at most half its lease; none while kept grants pin their share of that arena). Each
kept grant holds its own lease, so the master still counts it, and every lease is handed
back (riding on a later call) once its grant leaves, when evicted, expired, dropped or
cleared. A grant that reads bad bytes is dropped and the get asks the master again.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from kvpool.keys import BlockKey
from kvpool.protocol import ReadGrant

_SEEN = 1024  # recently read keys remembered, to tell a second read from a first


@dataclass(frozen=True, slots=True)
class HeldGrant:
    grant: ReadGrant
    lease: int
    until: float  # local monotonic time after which it is not used again


class HotGrants:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._held: OrderedDict[BlockKey, HeldGrant] = OrderedDict()
        self._seen: OrderedDict[BlockKey, None] = OrderedDict()

    def __len__(self) -> int:
        return len(self._held)

    def lookup(self, key: BlockKey, now: float, gone: list[int]) -> ReadGrant | None:
        """The kept grant of ``key``, if it is still good; an expired one is dropped and
        its lease appended to ``gone`` (to release)."""
        held = self._held.get(key)
        if held is None:
            return None
        if held.until <= now:
            del self._held[key]
            gone.append(held.lease)
            return None
        self._held.move_to_end(key)
        return held.grant

    def offer(self, key: BlockKey, grant: ReadGrant, lease: int, until: float,
              gone: list[int]) -> bool:
        """Keep a single-key get's grant (and its lease) if ``key`` was read recently;
        False: not kept, release the lease as usual. Leases of grants pushed out go to
        ``gone``."""
        if self.capacity <= 0:
            return False
        if key not in self._seen:
            self._seen[key] = None
            if len(self._seen) > _SEEN:
                self._seen.popitem(last=False)
            return False
        old = self._held.pop(key, None)
        if old is not None:
            gone.append(old.lease)
        self._held[key] = HeldGrant(grant, lease, until)
        while len(self._held) > self.capacity:
            gone.append(self._held.popitem(last=False)[1].lease)
        return True

    def drop(self, keys: list[BlockKey], gone: list[int]) -> None:
        """Forget the grants of ``keys`` (removed, or read bad bytes)."""
        for key in keys:
            held = self._held.pop(key, None)
            if held is not None:
                gone.append(held.lease)

    def clear(self, gone: list[int]) -> None:
        gone.extend(h.lease for h in self._held.values())
        self._held.clear()
