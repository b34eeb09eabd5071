"""The hot RPC between engines and the master: its calls and the records they answer with.

Records cross the wire as short msgpack arrays (as compact as positional lists), but
each side builds and reads them through the named types here, never by index.
``unpack`` checks the shape and raises BadRequest naming the record, so a malformed or
foreign answer fails loudly instead of being misread.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, NamedTuple

from kvpool.errors import BadRequest


class Call(enum.StrEnum):
    """Methods of the master's RPC (``/v1/rpc``)."""

    RESERVE = "reserve"
    COMMIT = "commit"
    ABORT = "abort"
    GET = "get"
    RELEASE = "release"
    EXISTS = "exists"
    MATCH = "match"
    REMOVE = "remove"
    PIN = "pin"
    UNPIN = "unpin"
    AGENTS = "agents"
    CORRUPT = "corrupt"
    REGISTER = "register"
    HEARTBEAT = "heartbeat"
    CHECK = "check"


def _shape(raw: Any, n: int, what: str) -> list[Any]:
    if not isinstance(raw, (list, tuple)) or len(raw) != n:
        raise BadRequest(f"malformed {what}: expected an array of {n}, got {raw!r:.80}")
    return list(raw)


class Location(NamedTuple):
    """Where a block's bytes are: what NIXL needs to reach them."""

    node: str
    agent: str  # the daemon's NIXL agent
    address: int
    size: int
    mem_type: str  # "DRAM" or "VRAM"
    device: int

    @classmethod
    def unpack(cls, raw: Any) -> "Location":
        node, agent, address, size, mem_type, device = _shape(raw, 6, "location")
        return cls(str(node), str(agent), int(address), int(size), str(mem_type), int(device))


class ReserveStatus(enum.IntEnum):
    NEW = 0  # space was reserved: write the bytes, then commit
    EXISTS = 1  # a complete block has this key: nothing to write
    IN_FLIGHT = 2  # another writer is storing this key right now


@dataclass(frozen=True, slots=True)
class Reservation:
    """What reserve answers for one key: its status, and for a NEW key one location per
    copy to write (the first is the primary); ``replicas`` copies exist or will."""

    status: ReserveStatus
    replicas: int
    locations: tuple[Location, ...] = ()

    def pack(self) -> list[Any]:
        return [int(self.status), self.replicas, [list(loc) for loc in self.locations]]

    @classmethod
    def unpack(cls, raw: Any) -> "Reservation":
        status, replicas, locations = _shape(raw, 3, "reservation")
        try:
            kind = ReserveStatus(status)
        except ValueError:
            raise BadRequest(f"unknown reservation status {status!r}") from None
        locs = tuple(Location.unpack(loc) for loc in locations)
        if (kind is ReserveStatus.NEW) != bool(locs):
            raise BadRequest("a NEW reservation has locations, and only a NEW one")
        return cls(kind, int(replicas), locs)


@dataclass(frozen=True, slots=True)
class ReadGrant:
    """Where to READ one block under the get's lease, and the header to verify it with."""

    location: Location
    header: bytes

    def pack(self) -> list[Any]:
        return [*self.location, self.header]

    @classmethod
    def unpack(cls, raw: Any) -> "ReadGrant | None":
        if raw is None:
            return None
        fields = _shape(raw, 7, "read grant")
        return cls(Location.unpack(fields[:6]), bytes(fields[6]))
