"""The hot RPC between engines and the master: its calls and the records they answer with.

Records cross the wire as short msgpack arrays (as compact as positional lists), but
each side builds and reads them through the named types here, never by index.
``unpack`` checks the shape and raises BadRequest naming the record, so a malformed or
foreign answer fails loudly instead of being misread. Requests are records too: the
master decodes each call's body into one (``*Request.unpack``) before it touches its
state, so a bad field is a BadRequest that changes nothing.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, NamedTuple

from kvpool import fields as f
from kvpool.errors import BadRequest, KVPoolError, error_from_code
from kvpool.keys import BlockKey


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
        return [int(self.status), self.replicas, self.locations]  # tuples pack as arrays

    @classmethod
    def unpack(cls, raw: Any) -> "Reservation":
        status, replicas, locations = _shape(raw, 3, "reservation")
        try:
            kind = ReserveStatus(status)
        except ValueError:
            raise BadRequest(f"unknown reservation status {status!r}") from None
        if not isinstance(locations, (list, tuple)) or type(replicas) is not int:
            raise BadRequest(f"a reservation is [status, replicas, [locations]], not {raw!r:.100}")
        locs = tuple(Location.unpack(loc) for loc in locations)
        if (kind is ReserveStatus.NEW) != bool(locs):
            raise BadRequest("a NEW reservation has locations, and only a NEW one")
        return cls(kind, replicas, locs)


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


def pack_unreadable(items: list[Any]) -> list[list[Any]]:
    """A get's blocks that are stored but cannot be read now (the items that are errors),
    as ``[index, code, message]`` each, alongside the grants."""
    return [[i, e.code, str(e)] for i, e in enumerate(items) if isinstance(e, KVPoolError)]


def unpack_unreadable(raw: Any, grants: list[ReadGrant | None]) -> list[ReadGrant | KVPoolError | None]:
    """The grants with each unreadable block's typed error in its place (a miss there)."""
    out: list[ReadGrant | KVPoolError | None] = list(grants)
    if not isinstance(raw, list):
        raise BadRequest(f"malformed unreadable items: expected an array, got {raw!r:.80}")
    for item in raw:
        i, code, message = _shape(item, 3, "unreadable item")
        if type(i) is not int or not 0 <= i < len(out) or out[i] is not None \
                or not isinstance(code, str) or not isinstance(message, str):
            raise BadRequest(f"malformed unreadable item {item!r:.80}")
        out[i] = error_from_code(code, message)
    return out


# -- requests -------------------------------------------------------------------------------
# Each call's body, decoded and checked (kvpool.fields) before the master acts on it. The
# body is a map, so a field a newer client adds is refused by name rather than misread.

_RIDING = frozenset({"release"})  # read leases a client is done with ride on any call


def released(body: dict[str, Any]) -> list[int]:
    """The lease ids riding on a call (``release``), checked: a bad list is refused
    before the call acts."""
    return f.field(body, "release", f.items(f.integer()), [])


def _body(raw: Any, call: Call, allowed: frozenset[str]) -> dict[str, Any]:
    body = f.body_map(raw, f"the body of {call.value}")
    f.only(body, allowed | _RIDING, call.value)
    return body


@dataclass(frozen=True, slots=True)
class ReserveRequest:
    """reserve: space for new blocks, ``parents`` (one per key, or none) chaining them;
    ``ttl_s``: the writer's own deadline to commit (at most the master's put timeout)."""

    keys: list[BlockKey]
    sizes: list[int]
    parents: list[BlockKey | None]
    prefer: str | None = None
    replicas: int = 1
    ttl_s: float | None = None
    meta: dict[str, Any] | None = None  # what the writer tells of its blocks (master.catalog)

    def pack(self) -> dict[str, Any]:
        body: dict[str, Any] = {"keys": self.keys, "sizes": self.sizes}
        if self.parents:
            body["parents"] = self.parents
        if self.prefer:
            body["prefer"] = self.prefer
        if self.replicas != 1:
            body["replicas"] = self.replicas
        if self.ttl_s is not None:
            body["ttl_s"] = self.ttl_s
        if self.meta is not None:
            body["meta"] = self.meta
        return body

    @classmethod
    def unpack(cls, raw: Any) -> "ReserveRequest":
        body = _body(raw, Call.RESERVE, frozenset(
            {"keys", "sizes", "parents", "prefer", "replicas", "ttl_s", "meta"}))
        keys = f.field(body, "keys", f.keys)
        sizes = f.field(body, "sizes", f.items(f.integer(1), f.MAX_KEYS))
        parents = f.field(body, "parents", f.items(f.optional_key, f.MAX_KEYS), [])
        f.same_length("reserve", ("keys", keys), ("sizes", sizes),
                      *((("parents", parents),) if parents else ()))
        return cls(keys, sizes, parents, f.field(body, "prefer", f.text, None),
                   f.field(body, "replicas", f.integer(1, 1 << 16), 1),
                   f.field(body, "ttl_s", f.number(0.001, 86400.0), None),
                   f.field(body, "meta", lambda v, what: f.body_map(v, what), None))


@dataclass(frozen=True, slots=True)
class CommitRequest:
    """commit: make a put's blocks visible, one encoded header per key."""

    put_id: int
    keys: list[BlockKey]
    headers: list[bytes]

    def pack(self) -> dict[str, Any]:
        return {"put_id": self.put_id, "keys": self.keys, "headers": self.headers}

    @classmethod
    def unpack(cls, raw: Any) -> "CommitRequest":
        body = _body(raw, Call.COMMIT, frozenset({"put_id", "keys", "headers"}))
        keys = f.field(body, "keys", f.keys)
        headers = f.field(body, "headers", f.items(f.blob(f.MAX_HEADER_BYTES), f.MAX_KEYS))
        f.same_length("commit", ("keys", keys), ("headers", headers))
        return cls(f.field(body, "put_id", f.integer()), keys, headers)


@dataclass(frozen=True, slots=True)
class AbortRequest:
    put_id: int
    keys: list[BlockKey]

    def pack(self) -> dict[str, Any]:
        return {"put_id": self.put_id, "keys": self.keys}

    @classmethod
    def unpack(cls, raw: Any) -> "AbortRequest":
        body = _body(raw, Call.ABORT, frozenset({"put_id", "keys"}))
        return cls(f.field(body, "put_id", f.integer()), f.field(body, "keys", f.keys))


@dataclass(frozen=True, slots=True)
class KeysRequest:
    """get, exists, match, remove, pin, unpin: keys and the call's options (each call
    names the options it takes; ``ttl_s`` is a soft pin's)."""

    keys: list[BlockKey]
    prefetch: bool = False
    force: bool = False
    prefix: bool = False
    ttl_s: float | None = None

    _OPTIONS = {Call.GET: frozenset(), Call.EXISTS: frozenset(), Call.MATCH: frozenset({"prefetch"}),
                Call.REMOVE: frozenset({"force"}), Call.PIN: frozenset({"prefix", "ttl_s"}),
                Call.UNPIN: frozenset({"prefix"})}

    @classmethod
    def unpack(cls, raw: Any, call: Call) -> "KeysRequest":
        options = cls._OPTIONS[call]
        body = _body(raw, call, options | {"keys"})
        flags = {name: f.field(body, name, f.boolean, False)
                 for name in ("prefetch", "force", "prefix") if name in options}
        ttl = f.field(body, "ttl_s", f.number(0.001, 7 * 86400.0), None) if "ttl_s" in options else None
        return cls(f.field(body, "keys", f.keys), ttl_s=ttl, **flags)


@dataclass(frozen=True, slots=True)
class ReleaseRequest:
    leases: list[int]

    @classmethod
    def unpack(cls, raw: Any) -> "ReleaseRequest":
        body = _body(raw, Call.RELEASE, frozenset({"leases"}))
        return cls(f.field(body, "leases", f.items(f.integer())))


@dataclass(frozen=True, slots=True)
class CorruptRequest:
    """corrupt: replicas (key, node) whose bytes failed a reader's checksum."""

    keys: list[BlockKey]
    nodes: list[str]

    @classmethod
    def unpack(cls, raw: Any) -> "CorruptRequest":
        body = _body(raw, Call.CORRUPT, frozenset({"keys", "nodes"}))
        keys = f.field(body, "keys", f.keys)
        nodes = f.field(body, "nodes", f.items(f.text, f.MAX_KEYS))
        f.same_length("corrupt", ("keys", keys), ("nodes", nodes))
        return cls(keys, nodes)


@dataclass(frozen=True, slots=True)
class AgentsRequest:
    agents: list[str]

    @classmethod
    def unpack(cls, raw: Any) -> "AgentsRequest":
        body = _body(raw, Call.AGENTS, frozenset({"agents"}))
        return cls(f.field(body, "agents", f.items(f.text, 4096)))


@dataclass(frozen=True, slots=True)
class HeartbeatRequest:
    node_id: str
    agent: str

    @classmethod
    def unpack(cls, raw: Any) -> "HeartbeatRequest":
        body = _body(raw, Call.HEARTBEAT, frozenset({"node_id", "agent"}))
        return cls(f.field(body, "node_id", f.text), f.field(body, "agent", f.text))
