"""The one link from the master to a pool daemon: what the master may ask, typed both ways.

``DaemonLink`` is the protocol; ``RpcDaemonLink`` speaks it over the daemon's RPC and
``daemon_endpoint`` serves it there, so method names and record shapes live only here.
Per-key outcomes come back as records whose ``error`` is a typed KVPoolError
(ChecksumMismatch, BlockNotFound, TierFull), never as strings for the master to match.

Every call a leader makes carries its leader generation (``Fence``): a daemon refuses a
master older than the newest it has heard from, so a deposed leader that does not know it
yet cannot change what a new leader has taken in from the daemon's inventory.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Generic, Protocol, Sequence, TypeVar

import numpy as np

from kvpool import fields as f
from kvpool import tracing
from kvpool.auth import Role
from kvpool.errors import BadRequest, InventoryExpired, KVPoolError, NotLeader, error_from_code
from kvpool.fields import need
from kvpool.keys import KEY_BYTES, BlockKey, parse_key
from kvpool.tiers.base import TIER_ORDER, TierKind
from kvpool.streamrpc import StreamRpcClient
from kvpool.wire import Handler

log = logging.getLogger(__name__)

DAEMON_RPC_PATH = "/v1/d/rpc"
# Blocks per inventory page: at ~90 bytes each (InventoryPage's columns), 50 k make a frame
# of ~4.5 MB, far under kvpool.wire.MAX_BODY, so an inventory of any size travels (and a
# node of millions of blocks is taken in) a page at a time.
INVENTORY_PAGE = 50_000
INVENTORY_PAGE_MAX = 200_000  # ~18 MB of frame: the most a daemon answers in one page


class DaemonCall(enum.StrEnum):
    ADOPT = "adopt"
    COPY = "copy"
    SEND = "send"
    DROP = "drop"
    INVENTORY = "inventory"
    REGISTRATION = "registration"
    HEALTH = "health"
    MARK = "mark"
    REGIONS = "regions"


_TIERS = {k.value: k for k in TierKind}
_CODE_TIER = TIER_ORDER  # an inventory page's tier codes (InventoryPage)
_TIER_CODE = {k: code for code, k in enumerate(_CODE_TIER)}


def _tier(raw: Any, what: str = "tier") -> TierKind:
    try:  # a table, not TierKind(raw): an inventory page decodes one per block
        return _TIERS[raw]
    except (KeyError, TypeError):
        raise BadRequest(f"'{what}': unknown tier {raw!r:.40}; one of "
                         f"{', '.join(k.value for k in TierKind)}") from None


def _fields(raw: Any, n: int, what: str) -> list[Any]:
    if not isinstance(raw, (list, tuple)) or len(raw) != n:
        raise BadRequest(f"malformed {what}: expected an array of {n}")
    return list(raw)


_OFFSET = f.integer()
_HEADER = f.blob(f.MAX_HEADER_BYTES)


@dataclass(slots=True)
class StoredBlock:
    """A block a daemon holds (inventory), or is told to record (adopt): for arenas the
    offset, for cold tiers 0; the encoded BlockHeader travels as is. A value (change one
    with ``dataclasses.replace``), not frozen: that quadruples the cost of making one,
    paid per block of every inventory."""

    key: BlockKey
    tier: TierKind
    location: int
    size: int
    header: bytes

    def pack(self) -> list[Any]:
        return [self.key, self.tier.value, self.location, self.size, self.header]

    @classmethod
    def unpack(cls, raw: Any) -> "StoredBlock":
        key, tier, location, size, header = _fields(raw, 5, "stored block")
        return cls(f.key(key, "stored block key"), _tier(tier),
                   _OFFSET(location, "stored block location"), _OFFSET(size, "stored block size"),
                   _HEADER(header, "stored block header"))


@dataclass(frozen=True, slots=True)
class PinMark:
    """A block's pins as the daemons holding it keep them for the master, so a new leader
    finds them in the inventories it rebuilds from: hard pins (counted) and a soft pin's
    end as wall-clock seconds (monotonic clocks differ between masters). A mark with no
    pin left is the daemon's cue to forget it."""

    key: BlockKey
    pins: int = 0
    soft_until: float = 0.0  # time.time() at which a soft pin ends; 0: none

    @property
    def empty(self) -> bool:
        return self.pins <= 0 and self.soft_until <= time.time()

    def pack(self) -> list[Any]:
        return [self.key, self.pins, self.soft_until]

    @classmethod
    def unpack(cls, raw: Any) -> "PinMark":
        key, pins, soft_until = _fields(raw, 3, "pin mark")
        if isinstance(soft_until, bool) or not isinstance(soft_until, (int, float)) \
                or not 0 <= soft_until < 1e12:
            raise BadRequest("a pin mark's soft_until is a wall-clock time in seconds")
        return cls(f.key(key, "pin mark key"), f.integer(0, 1 << 31)(pins, "pin mark pins"),
                   float(soft_until))


def take_marks(held: dict[BlockKey, PinMark], marks: Sequence[PinMark]) -> None:
    """A daemon's record of pins, as the master's ``mark`` call updates it."""
    for m in marks:
        if m.empty:
            held.pop(m.key, None)
        else:
            held[m.key] = m


@dataclass(frozen=True, slots=True)
class CopyResult:
    """One key of a tier-to-tier copy: the bytes stored at the destination, or why not."""

    size: int = 0
    error: KVPoolError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def pack(self) -> list[Any]:
        if self.error is None:
            return [self.size, "", ""]
        return [0, self.error.code, str(self.error)]

    @classmethod
    def unpack(cls, raw: Any) -> "CopyResult":
        size, code, message = _fields(raw, 3, "copy result")
        if not code:
            return cls(f.integer()(size, "copy result size"))
        return cls(0, error_from_code(str(code), str(message)))


@dataclass(frozen=True, slots=True)
class SendItem:
    """One block a daemon writes into another node's arena (a drain): the key, the tier
    it is read from here, and the absolute address in the peer's registered arena (space
    the master allocated there)."""

    key: BlockKey
    tier: TierKind
    address: int

    def pack(self) -> list[Any]:
        return [self.key, self.tier.value, self.address]

    @classmethod
    def unpack(cls, raw: Any) -> "SendItem":
        key, tier, address = _fields(raw, 3, "send item")
        if not isinstance(address, int) or address < 0:
            raise BadRequest("a send item's address is a non-negative integer")
        return cls(parse_key(key), _tier(tier), address)


@dataclass(frozen=True, slots=True)
class SendTarget:
    """The peer arena a send writes into: its NIXL agent metadata and memory kind."""

    metadata: bytes
    mem_type: str = "DRAM"
    device: int = 0
    deadline_s: float = 30.0  # the transfer's deadline

    def pack(self) -> dict[str, Any]:
        return {"metadata": self.metadata, "mem_type": self.mem_type, "device": self.device,
                "deadline_s": self.deadline_s}

    @classmethod
    def unpack(cls, body: Any) -> "SendTarget":
        if not isinstance(body, dict):
            raise BadRequest("a send target is a map")
        deadline = need(body, "deadline_s", (int, float))
        if not 0 < deadline <= 600:
            raise BadRequest(f"send deadline_s={deadline!r} is outside (0, 600]")
        mem_type = need(body, "mem_type", str)
        if mem_type not in ("DRAM", "VRAM"):
            raise BadRequest(f"send mem_type {mem_type!r} is not DRAM or VRAM")
        return cls(need(body, "metadata", bytes), mem_type, need(body, "device", int), float(deadline))


@dataclass(frozen=True, slots=True)
class TierDescription:
    """One tier as a daemon announces it: arenas give NIXL's view (address, memory type,
    device); a shared object store names itself so every node naming it shares one space."""

    kind: TierKind
    capacity: int
    address: int = 0
    mem_type: str = "DRAM"
    device: int = 0
    store: str = ""

    def pack(self) -> list[Any]:
        return [self.kind.value, self.capacity, self.address, self.mem_type, self.device, self.store]

    @classmethod
    def unpack(cls, raw: Any) -> "TierDescription":
        kind, capacity, address, mem_type, device, store = _fields(raw, 6, "tier description")
        if not all(isinstance(v, int) and v >= 0 for v in (capacity, address, device)):
            raise BadRequest("a tier's capacity, address and device are non-negative integers")
        return cls(_tier(kind), capacity, address, str(mem_type), device, str(store))


@dataclass(frozen=True, slots=True)
class Registration:
    """Everything a master needs to take a node in, but its blocks: how to reach it (RPC
    and NIXL), its tiers and its membership TTL. The inventory follows in pages
    (``inventory``), since a node may hold more blocks than one frame carries."""

    node_id: str
    url: str
    agent: str
    metadata: bytes  # NIXL agent metadata
    ttl_s: float
    tiers: list[TierDescription]

    def pack(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "url": self.url, "agent": self.agent,
                "metadata": self.metadata, "ttl_s": self.ttl_s,
                "tiers": [t.pack() for t in self.tiers]}

    @classmethod
    def unpack(cls, body: Any) -> "Registration":
        if not isinstance(body, dict):
            raise BadRequest("a registration is a map")
        node_id = need(body, "node_id", str)
        if not node_id:
            raise BadRequest("registration needs a node_id")
        ttl = need(body, "ttl_s", (int, float))
        if not 0 < ttl <= 3600:
            raise BadRequest(f"membership ttl_s={ttl!r} is outside (0, 3600]")
        tiers = [TierDescription.unpack(t) for t in need(body, "tiers", list)]
        if not tiers:
            raise BadRequest("registration needs a non-empty list of tiers")
        return cls(node_id, need(body, "url", str), need(body, "agent", str),
                   need(body, "metadata", bytes), float(ttl), tiers)


@dataclass(frozen=True, slots=True)
class InventoryRequest:
    """inventory: a page of the snapshot ``snapshot`` from ``offset`` on; snapshot 0 takes
    a new snapshot (and ``offset`` is then 0)."""

    snapshot: int = 0
    offset: int = 0
    limit: int = INVENTORY_PAGE

    def pack(self) -> dict[str, Any]:
        return {"snapshot": self.snapshot, "offset": self.offset, "limit": self.limit}

    @classmethod
    def unpack(cls, raw: Any) -> "InventoryRequest":
        body = f.body_map(raw, "the body of inventory")
        f.only(body, frozenset({"snapshot", "offset", "limit"}), "inventory")
        req = cls(f.field(body, "snapshot", f.integer(0, 1 << 62), 0),
                  f.field(body, "offset", f.integer(0, 1 << 62), 0),
                  f.field(body, "limit", f.integer(1, INVENTORY_PAGE_MAX), INVENTORY_PAGE))
        if req.snapshot == 0 and req.offset:
            raise BadRequest("an inventory's first page (snapshot 0) starts at offset 0")
        return req


@dataclass(frozen=True, slots=True)
class InventoryPage:
    """One page of a daemon's inventory as of the moment its first page was asked (the
    snapshot), with the pins the daemon keeps for the blocks in it. ``next`` is where the
    next page starts; equal to ``total`` on the last.

    On the wire its blocks go as columns (the keys end to end, a tier code each, the
    locations and sizes as little-endian u64 arrays, the headers end to end with their
    ends as u32), not as an array per block: a new leader takes in millions, and checking
    and building them column by column costs a quarter of item by item."""

    snapshot: int
    total: int
    next: int
    blocks: list[StoredBlock]
    marks: list[PinMark]

    @property
    def done(self) -> bool:
        return self.next >= self.total

    def pack(self) -> dict[str, Any]:
        blocks, n = self.blocks, len(self.blocks)
        headers = [b.header for b in blocks]
        return {"snapshot": self.snapshot, "total": self.total, "next": self.next,
                "keys": b"".join([b.key for b in blocks]),
                "tiers": bytes([_TIER_CODE[b.tier] for b in blocks]),
                "locations": np.fromiter((b.location for b in blocks), "<u8", n).tobytes(),
                "sizes": np.fromiter((b.size for b in blocks), "<u8", n).tobytes(),
                "headers": b"".join(headers),
                "header_ends": np.cumsum(np.fromiter(map(len, headers), "<u4", n),
                                         dtype="<u4").tobytes(),
                "marks": [m.pack() for m in self.marks]}

    @classmethod
    def unpack(cls, body: Any) -> "InventoryPage":
        if not isinstance(body, dict):
            raise BadRequest("an inventory page is a map")
        keys, tiers, headers = (need(body, name, bytes) for name in ("keys", "tiers", "headers"))
        n = len(tiers)
        columns = {name: need(body, name, bytes) for name in ("locations", "sizes", "header_ends")}
        for name, width in (("keys", KEY_BYTES), ("locations", 8), ("sizes", 8), ("header_ends", 4)):
            got = len(keys) if name == "keys" else len(columns[name])
            if got != n * width:
                raise BadRequest(f"an inventory page of {n} blocks has {got} bytes of "
                                 f"'{name}', not {n * width}")
        if n and max(tiers) >= len(_CODE_TIER):
            raise BadRequest(f"an inventory page names an unknown tier code {max(tiers)}; "
                             f"codes 0..{len(_CODE_TIER) - 1} are "
                             f"{', '.join(k.value for k in _CODE_TIER)}")
        ends = np.frombuffer(columns["header_ends"], "<u4").astype(np.int64)
        lengths = np.diff(ends, prepend=0)
        if n and (lengths.min() < 0 or lengths.max() > f.MAX_HEADER_BYTES or ends[-1] != len(headers)):
            raise BadRequest(f"an inventory page's header ends do not cut its {len(headers)} "
                             f"bytes of headers into headers of at most {f.MAX_HEADER_BYTES}")
        starts, stops = (ends - lengths).tolist(), ends.tolist()
        blocks = list(map(StoredBlock,
                          [keys[i:i + KEY_BYTES] for i in range(0, n * KEY_BYTES, KEY_BYTES)],
                          [_CODE_TIER[c] for c in tiers],
                          np.frombuffer(columns["locations"], "<u8").tolist(),
                          np.frombuffer(columns["sizes"], "<u8").tolist(),
                          [headers[a:b] for a, b in zip(starts, stops)]))
        return cls(need(body, "snapshot", int), need(body, "total", int), need(body, "next", int),
                   blocks, [PinMark.unpack(m) for m in need(body, "marks", list)])


T = TypeVar("T")


class InventorySnapshots(Generic[T]):
    """A daemon's side of paged inventories: the first page takes a snapshot (a list of
    references to the tiers' records, cheap even for millions), later pages read on from
    it, so a reader of every page sees the inventory of one moment, as a single frame
    did. A snapshot goes once its last page is read, when idle for ``idle_s``, or when
    ``keep`` newer ones exist; a page of a snapshot gone answers InventoryExpired."""

    def __init__(self, take: Callable[[], list[T]],
                 stored: Callable[[Sequence[T]], list[StoredBlock]],
                 marks: Callable[[], dict[BlockKey, PinMark]],
                 keep: int = 4, idle_s: float = 60.0) -> None:
        self._take, self._stored, self._marks = take, stored, marks
        self._keep, self._idle_s = keep, idle_s
        self._ids = itertools.count(1)
        self._open: dict[int, tuple[list[T], float]] = {}  # id -> (items, last read, monotonic)

    def page(self, req: InventoryRequest) -> InventoryPage:
        now = time.monotonic()
        for sid in [s for s, (_, used) in self._open.items() if now - used > self._idle_s]:
            del self._open[sid]
        if req.snapshot == 0:
            sid, items = next(self._ids), self._take()
            while len(self._open) >= self._keep:
                del self._open[min(self._open)]
        else:
            sid = req.snapshot
            held = self._open.get(sid)
            if held is None:
                raise InventoryExpired(f"inventory snapshot {sid} is gone (read to its end, idle "
                                       f"over {self._idle_s:.0f} s, or overtaken); start again")
            items = held[0]
        end = min(len(items), req.offset + req.limit)
        if end >= len(items):
            self._open.pop(sid, None)
        else:
            self._open[sid] = (items, now)
        blocks = self._stored(items[req.offset:end])
        marks = self._marks()
        pins = [m for b in blocks if (m := marks.get(b.key)) is not None and not m.empty]
        return InventoryPage(sid, len(items), end, blocks, pins)


async def inventory_pages(link: "DaemonService", page: int = INVENTORY_PAGE
                          ) -> AsyncIterator[InventoryPage]:
    """Every page of one snapshot of a daemon's inventory, in order. The next page is asked
    for before this one is yielded, so the daemon reads and packs it while the caller
    takes this one in (a new leader's rebuild waited on each page in turn). Close the
    iterator (``contextlib.aclosing``) when leaving it early: that cancels the page ahead."""
    offset = 0  # of the request ``got`` answers
    got = await link.inventory(InventoryRequest(0, offset, page))
    while True:
        ahead: asyncio.Future[InventoryPage] | None = None
        if not got.done:
            if got.next <= offset or got.snapshot <= 0:
                raise BadRequest(f"an inventory page ended at {got.next} of {got.total}, "
                                 f"from offset {offset}: no progress")
            offset = got.next
            ahead = asyncio.ensure_future(link.inventory(
                InventoryRequest(got.snapshot, offset, page)))
        try:
            yield got
        except BaseException:
            if ahead is not None:
                ahead.cancel()
            raise
        finally:
            if ahead is not None and ahead.done() and not ahead.cancelled():
                ahead.exception()  # retrieved: raised below, or dropped with the caller
        if ahead is None:
            return
        got = await ahead


async def whole_inventory(link: "DaemonService", page: int = INVENTORY_PAGE) -> list[StoredBlock]:
    """A daemon's inventory of one moment, gathered from its pages."""
    blocks: list[StoredBlock] = []
    async for got in inventory_pages(link, page):
        blocks.extend(got.blocks)
    return blocks


@dataclass(frozen=True, slots=True)
class Health:
    node_id: str
    agent: str  # a new one on every daemon start: tells a restarted daemon from the old one
    tiers: dict[str, list[int]]  # kind -> [capacity, used, blocks]

    def pack(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "agent": self.agent, "tiers": self.tiers}

    @classmethod
    def unpack(cls, body: Any) -> "Health":
        if not isinstance(body, dict):
            raise BadRequest("a health answer is a map")
        return cls(need(body, "node_id", str), need(body, "agent", str), dict(body.get("tiers", {})))


@dataclass(frozen=True, slots=True)
class CopyRequest:
    """copy: blocks from one tier of a node to another, arena destinations at the offsets
    the master allocated (0 for cold tiers)."""

    keys: list[BlockKey]
    src: TierKind
    dst: TierKind
    locations: list[int]

    def pack(self) -> dict[str, Any]:
        return {"keys": list(self.keys), "src": self.src.value, "dst": self.dst.value,
                "locations": list(self.locations)}

    @classmethod
    def unpack(cls, raw: Any) -> "CopyRequest":
        body = f.body_map(raw, "the body of copy")
        f.only(body, frozenset({"keys", "src", "dst", "locations"}), "copy")
        keys = f.field(body, "keys", f.keys)
        locations = f.field(body, "locations", f.items(f.integer(), f.MAX_KEYS))
        f.same_length("copy", ("keys", keys), ("locations", locations))
        src, dst = _tier(body.get("src"), "src"), _tier(body.get("dst"), "dst")
        if src is dst:
            raise BadRequest(f"copy from {src.value} to itself")
        return cls(keys, src, dst, locations)


@dataclass(frozen=True, slots=True)
class DropRequest:
    tier: TierKind
    keys: list[BlockKey]

    def pack(self) -> dict[str, Any]:
        return {"tier": self.tier.value, "keys": list(self.keys)}

    @classmethod
    def unpack(cls, raw: Any) -> "DropRequest":
        body = f.body_map(raw, "the body of drop")
        f.only(body, frozenset({"tier", "keys"}), "drop")
        return cls(_tier(body.get("tier")), f.field(body, "keys", f.keys))


@dataclass(frozen=True, slots=True)
class AdoptRequest:
    blocks: list[StoredBlock]

    def pack(self) -> dict[str, Any]:
        return {"blocks": [b.pack() for b in self.blocks]}

    @classmethod
    def unpack(cls, raw: Any) -> "AdoptRequest":
        body = f.body_map(raw, "the body of adopt")
        f.only(body, frozenset({"blocks"}), "adopt")
        return cls(f.field(body, "blocks", f.items(lambda b, _: StoredBlock.unpack(b), f.MAX_KEYS)))


@dataclass(frozen=True, slots=True)
class ArenaRegion:
    """A slice of one arena that the daemon registers with NIXL on its own (a tenant's
    region, or the common one: master.regions)."""

    tier: TierKind
    name: str
    offset: int  # from the arena's base
    size: int

    def pack(self) -> list[Any]:
        return [self.tier.value, self.name, self.offset, self.size]

    @classmethod
    def unpack(cls, raw: Any) -> "ArenaRegion":
        tier, name, offset, size = _fields(raw, 4, "arena region")
        if not isinstance(name, str) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in (offset, size)) \
                or offset < 0 or size <= 0:
            raise BadRequest("an arena region is [tier, name, offset >= 0, size > 0]")
        return cls(_tier(tier), name, offset, size)


@dataclass(frozen=True, slots=True)
class RegionMetadata:
    """The daemon's answer to ``regions``: its agent's whole metadata (for the master and
    peer daemons) and one partial blob per region asked, in the order asked."""

    metadata: bytes
    regions: list[bytes]

    def pack(self) -> dict[str, Any]:
        return {"metadata": self.metadata, "regions": self.regions}

    @classmethod
    def unpack(cls, body: Any) -> "RegionMetadata":
        if not isinstance(body, dict):
            raise BadRequest("a regions answer is a map")
        blobs = need(body, "regions", list)
        if not all(isinstance(b, bytes) for b in blobs):
            raise BadRequest("a regions answer's regions are NIXL metadata blobs")
        return cls(need(body, "metadata", bytes), blobs)


class DaemonService(Protocol):
    """What the master asks of one daemon (the pool daemon implements it)."""

    async def adopt(self, blocks: Sequence[StoredBlock]) -> None:
        """Record blocks that clients wrote into arenas (a put's commit)."""

    async def copy(self, keys: Sequence[BlockKey], src: TierKind, dst: TierKind,
                   locations: Sequence[int]) -> list[CopyResult]:
        """Copy blocks between this node's tiers (arena destinations at the given offsets,
        already allocated by the master); the source keeps its copy."""

    async def send(self, target: SendTarget, items: Sequence[SendItem]) -> list[CopyResult]:
        """Write blocks of this node into another node's arena through NIXL (the peer
        records them when the master adopts them there); this node keeps its copy."""

    async def drop(self, tier: TierKind, keys: Sequence[BlockKey]) -> int:
        """Forget blocks of one tier; returns how many were there."""

    async def inventory(self, req: InventoryRequest) -> InventoryPage:
        """One page of the inventory (InventorySnapshots serves them)."""

    async def mark(self, marks: Sequence[PinMark]) -> None:
        """Keep (or, once empty, forget) the pins of blocks for a later leader."""

    async def registration(self, rescan: bool = False) -> Registration:
        """Tiers and NIXL metadata (the inventory is paged); ``rescan`` lists a shared
        store again first."""

    async def health(self) -> Health: ...

    async def regions(self, regions: Sequence[ArenaRegion]) -> RegionMetadata:
        """Register each region with NIXL on its own (instead of whole arenas), unless that
        is already the layout; returns the metadata to hand out."""


class DaemonLink(DaemonService, Protocol):
    """The master's end of one daemon: the service, plus closing the link."""

    async def close(self) -> None: ...


class RpcDaemonLink:
    """DaemonLink over the daemon's stream RPC (one persistent connection; kvpool.streamrpc):
    a put's commit waits on this link's adopt, so it takes the faster transport."""

    def __init__(self, url: str, timeout_s: float = 30.0, token: str = "",
                 tls: ssl.SSLContext | None = None, generation: int = 0) -> None:
        self.url = url
        self.generation = generation  # the leader's (Fence); 0: a caller that leads nothing
        self._rpc = StreamRpcClient(url, timeout_s=timeout_s, path=DAEMON_RPC_PATH, token=token,
                                    tls=tls)

    async def _call(self, name: DaemonCall, body: dict[str, Any] | None = None) -> Any:
        """A call on the daemon, with the leader's generation; made for a request, it
        carries the request's id."""
        request_id = tracing.current()
        if request_id is not None or self.generation:
            body = dict(body or {})
            if request_id is not None:
                body["trace"] = [request_id, "master"]
            if self.generation:
                body["generation"] = self.generation
        return await self._rpc.call(name, body)

    async def adopt(self, blocks: Sequence[StoredBlock]) -> None:
        await self._call(DaemonCall.ADOPT, AdoptRequest(list(blocks)).pack())

    async def copy(self, keys: Sequence[BlockKey], src: TierKind, dst: TierKind,
                   locations: Sequence[int]) -> list[CopyResult]:
        res = await self._call(DaemonCall.COPY,
                               CopyRequest(list(keys), src, dst, list(locations)).pack())
        results = [CopyResult.unpack(r) for r in need(res, "results", list)]
        if len(results) != len(keys):
            raise BadRequest(f"the daemon at {self.url} answered {len(results)} copy results "
                             f"for {len(keys)} keys")
        return results

    async def send(self, target: SendTarget, items: Sequence[SendItem]) -> list[CopyResult]:
        res = await self._call(DaemonCall.SEND, {"target": target.pack(),
                                                     "items": [i.pack() for i in items]})
        results = [CopyResult.unpack(r) for r in need(res, "results", list)]
        if len(results) != len(items):
            raise BadRequest(f"the daemon at {self.url} answered {len(results)} send results "
                             f"for {len(items)} blocks")
        return results

    async def drop(self, tier: TierKind, keys: Sequence[BlockKey]) -> int:
        res = await self._call(DaemonCall.DROP, DropRequest(tier, list(keys)).pack())
        return int(need(res, "dropped", int))

    async def inventory(self, req: InventoryRequest) -> InventoryPage:
        return InventoryPage.unpack(await self._call(DaemonCall.INVENTORY, req.pack()))

    async def mark(self, marks: Sequence[PinMark]) -> None:
        await self._call(DaemonCall.MARK, {"marks": [m.pack() for m in marks]})

    async def registration(self, rescan: bool = False) -> Registration:
        return Registration.unpack(await self._call(DaemonCall.REGISTRATION, {"rescan": rescan}))

    async def health(self) -> Health:
        return Health.unpack(await self._call(DaemonCall.HEALTH))

    async def regions(self, regions: Sequence[ArenaRegion]) -> RegionMetadata:
        answer = RegionMetadata.unpack(await self._call(
            DaemonCall.REGIONS, {"regions": [r.pack() for r in regions]}))
        if len(answer.regions) != len(regions):
            raise BadRequest(f"the daemon at {self.url} answered {len(answer.regions)} region "
                             f"blobs for {len(regions)} regions")
        return answer

    async def close(self) -> None:
        await self._rpc.close()


async def probe(url: str, agent: str, timeout_s: float = 1.0, token: str = "",
                tls: ssl.SSLContext | None = None) -> bool:
    """Does the daemon at ``url`` answer, as the same agent? The one liveness check: a
    node id held by a daemon that answers is taken; one whose holder is silent is stale.
    ``token``: the cluster credential (a daemon answers nobody else)."""
    link = RpcDaemonLink(url, timeout_s=timeout_s, token=token, tls=tls)
    try:
        return (await link.health()).agent == agent
    except KVPoolError:
        return False
    finally:
        await link.close()


# Every call on a daemon is the cluster's: only masters (holding its credential) call them.
DAEMON_ROLES: dict[str, frozenset[Role]] = {c: frozenset({Role.CLUSTER}) for c in DaemonCall}
# Calls whose handlers wait on nothing that needs a task: the stream RPC answers them inline.
DAEMON_EAGER = frozenset({DaemonCall.ADOPT, DaemonCall.HEALTH, DaemonCall.INVENTORY,
                          DaemonCall.MARK})


@dataclass(slots=True)
class Fence:
    """The newest leader generation a daemon has heard from. A leader's generation grows
    with every term (master.election), and its calls carry it: one older than the newest
    is a deposed leader's, which may not know it is deposed yet (a pause, or etcd ending
    its lease early) and is refused, since the new leader may have read this daemon's
    inventory already and would never learn of what it changed. A daemon handles calls one
    at a time up to their first wait, so a call admitted before the new leader's first
    lands before its inventory snapshot is taken. Calls without a generation (probes,
    tools) lead nothing and are not fenced."""

    newest: int = 0
    refused: int = 0  # the last generation refused (said once in the log, not per call)

    def admit(self, generation: Any, call: str) -> None:
        if generation is None:
            return
        if type(generation) is not int or generation < 1:
            raise BadRequest(f"a call's leader generation is a positive integer, not {generation!r}")
        if generation < self.newest:
            if generation != self.refused:
                self.refused = generation
                log.warning("refusing the calls of a deposed master (leader generation %d; "
                            "generation %d leads)", generation, self.newest)
            raise NotLeader(f"{call} from a master of leader generation {generation}, but one of "
                            f"generation {self.newest} leads now: refused (this master is "
                            "deposed; ask the leader)")
        self.newest = generation


def daemon_endpoint(daemon: DaemonService, fence: Fence) -> dict[str, Handler]:
    """The RPC handlers that serve ``daemon`` (the pool daemon itself) to the master, every
    call past ``fence`` (one per daemon, whichever transport the call came by)."""

    async def adopt(body: dict[str, Any]) -> Any:
        blocks = AdoptRequest.unpack(body).blocks
        await daemon.adopt(blocks)
        return {"adopted": len(blocks)}

    async def copy(body: dict[str, Any]) -> Any:
        req = CopyRequest.unpack(body)
        results = await daemon.copy(req.keys, req.src, req.dst, req.locations)
        return {"results": [r.pack() for r in results]}

    async def send(body: dict[str, Any]) -> Any:
        target = SendTarget.unpack(need(body, "target", dict))
        items = [SendItem.unpack(i) for i in need(body, "items", list)]
        return {"results": [r.pack() for r in await daemon.send(target, items)]}

    async def drop(body: dict[str, Any]) -> Any:
        req = DropRequest.unpack(body)
        return {"dropped": await daemon.drop(req.tier, req.keys)}

    async def inventory(body: dict[str, Any]) -> Any:
        return (await daemon.inventory(InventoryRequest.unpack(body))).pack()

    async def registration(body: dict[str, Any]) -> Any:
        return (await daemon.registration(f.field(body, "rescan", f.boolean, False))).pack()

    async def health(body: dict[str, Any]) -> Any:
        return (await daemon.health()).pack()

    async def mark(body: dict[str, Any]) -> Any:
        body = f.body_map(body, "the body of mark")
        f.only(body, frozenset({"marks"}), "mark")
        marks = f.field(body, "marks", f.items(lambda m, _: PinMark.unpack(m), f.MAX_KEYS))
        await daemon.mark(marks)
        return {"marked": len(marks)}

    async def regions(body: dict[str, Any]) -> Any:
        body = f.body_map(body, "the body of regions")
        f.only(body, frozenset({"regions"}), "regions")
        asked = f.field(body, "regions", f.items(lambda r, _: ArenaRegion.unpack(r), 1024))
        return (await daemon.regions(asked)).pack()

    handlers = {DaemonCall.ADOPT: adopt, DaemonCall.COPY: copy, DaemonCall.SEND: send,
                DaemonCall.DROP: drop, DaemonCall.INVENTORY: inventory,
                DaemonCall.REGISTRATION: registration, DaemonCall.HEALTH: health,
                DaemonCall.MARK: mark, DaemonCall.REGIONS: regions}
    return {name: _traced(name, h, fence) for name, h in handlers.items()}


def _traced(name: str, handler: Handler, fence: Fence) -> Handler:
    """Run a call past the fence and, made for a request, as that request's (its id in
    this daemon's log lines)."""

    async def call(body: dict[str, Any]) -> Any:
        if isinstance(body, dict):
            fence.admit(body.pop("generation", None), name)
        request_id, _ = tracing.from_wire(body) if isinstance(body, dict) else (None, "")
        if request_id is None:
            return await handler(body)
        with tracing.use(request_id):
            start = time.perf_counter()
            try:
                return await handler(body)
            finally:
                tracing.note("daemon %s took %.2f ms", name, (time.perf_counter() - start) * 1e3)

    return call
