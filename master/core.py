"""The master's logic: membership, two-phase put, leased gets, removal, tier pressure.

Everything here runs on one asyncio loop, so index updates between awaits are atomic.
Daemons are told about a block before the index shows it (commit), and forget it before
its arena space is handed out again (drop, then free), so the index never points at
bytes that are not there.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import defaultdict
from typing import Any

from kvpool.codec import BlockHeader
from kvpool.config import MasterConfig
from kvpool.coordinator import Coordinator, EventKind, LeaseExpired, cluster_prefix
from kvpool.errors import (BadRequest, BlockLeased, BlockNotFound, KVPoolError, NodeGone,
                           NotLeader, NotReady, ReservationLost, TierFull, Unavailable)
from kvpool.keys import BlockKey, parse_key
from kvpool.tiers.base import TierKind
from kvpool.wire import EXISTS, IN_FLIGHT, NEW, Location, RpcClient
from master.index import BlockEntry, BlockState, Index, Replica
from master.nodes import Node, TierSpace, parse_tiers
from master.placement import arena_candidates, extra_replica_spaces, pressured, relief_target

log = logging.getLogger(__name__)


class EventHub:
    """Block stored / removed events for the admin stream (what a KV-aware router reads)."""

    def __init__(self) -> None:
        self._subs: set[asyncio.Queue[dict[str, Any]]] = set()

    def emit(self, kind: str, key: BlockKey, node: str, tier: TierKind | None = None,
             size: int = 0) -> None:
        if not self._subs:
            return
        event = {"type": kind, "key": key.hex(), "node": node,
                 "tier": tier.value if tier else None, "size": size, "ts": time.time()}
        for q in self._subs:
            if q.qsize() < 10_000:
                q.put_nowait(event)

    def subscribe(self) -> asyncio.Queue[dict[str, Any]]:
        """A queue of every event from now on (a bounded backlog); unsubscribe when done."""
        q: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._subs.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[dict[str, Any]]) -> None:
        self._subs.discard(q)


class MasterCore:
    def __init__(self, cfg: MasterConfig, coordinator: Coordinator) -> None:
        self.cfg = cfg
        self.coord = coordinator
        self.prefix = cluster_prefix(cfg.cluster)
        self.index = Index()
        self.nodes: dict[str, Node] = {}
        # Shared object stores by owner id ("@" + store): their replicas belong to no node,
        # so a node's death leaves them, and any node naming the store can promote them.
        self.stores: dict[str, TierSpace] = {}
        self.events = EventHub()
        self.counters: dict[str, int] = defaultdict(int)
        self._ids = random.SystemRandom()
        self._leases: dict[int, tuple[float, list[BlockKey]]] = {}  # lease -> expiry, keys
        self._relieving: dict[tuple[str, TierKind], asyncio.Lock] = defaultdict(asyncio.Lock)
        self.clustered = False  # with etcd: daemons join through it, never by `register`
        self.leader = True  # single node: always; with etcd, while this master holds the lease
        self.leader_url = ""  # with etcd: the leader as last seen, for NotLeader messages
        self.ready = True  # False while a new leader rebuilds its index
        self.term = self._ids.getrandbits(30) | 1  # tags put ids: a new leader knows foreign ones

    def _new_id(self) -> int:
        return self._ids.getrandbits(63) | 1

    def _new_put_id(self) -> int:
        return (self.term << 32) | self._ids.getrandbits(32)

    def gate(self) -> None:
        """Engines' and daemons' calls are served by a ready leader only."""
        if not self.leader:
            where = f"the leader is {self.leader_url}" if self.leader_url else "no leader is elected yet"
            raise NotLeader(f"this master is a standby; {where}")
        if not self.ready:
            raise NotReady("this master was just elected and is rebuilding its index from the "
                           "daemons' inventories; retry in a moment")

    async def begin_term(self) -> None:
        """Leadership starts: forget everything; the index is rebuilt from the daemons."""
        await self.end_term()
        self.term = self._ids.getrandbits(30) | 1
        self.leader = True

    async def end_term(self) -> None:
        """Leadership ends: serve nothing, hold no links. Reservations of the term are lost."""
        self.leader, self.ready = False, False
        nodes, self.nodes = list(self.nodes.values()), {}
        self.stores = {}
        self.index = Index()
        self._leases.clear()
        self._relieving.clear()
        for node in nodes:
            await node.link.close()

    def location(self, replica: Replica) -> Location:
        node = self.nodes[replica.node]
        space = node.tiers[replica.tier]
        return Location(node.node_id, node.agent, space.address + replica.location,
                        replica.size, space.mem_type, space.device)

    # -- owners of replicas: nodes, and shared object stores ------------------------------

    @staticmethod
    def owner(node: Node, kind: TierKind) -> str:
        """Who a replica in ``node``'s tier ``kind`` belongs to: the node, or its shared store."""
        space = node.tiers.get(kind)
        return f"@{space.store}" if space is not None and space.store else node.node_id

    def _space(self, owner: str, kind: TierKind) -> TierSpace | None:
        if owner.startswith("@"):
            return self.stores.get(owner)
        node = self.nodes.get(owner)
        return node.tiers.get(kind) if node is not None else None

    def _node_for(self, owner: str) -> Node | None:
        """The live node that acts for an owner: itself, or for a store the node naming it
        with the most free host arena."""
        if not owner.startswith("@"):
            return self.nodes.get(owner)
        users = [n for n in self.nodes.values() if self.owner(n, TierKind.OBJECT) == owner]
        return max(users, key=lambda n: n.tiers[TierKind.HOST].capacity - n.tiers[TierKind.HOST].used
                   if TierKind.HOST in n.tiers else -1, default=None)

    # -- membership -----------------------------------------------------------------------

    async def register(self, body: dict[str, Any]) -> dict[str, Any]:
        """A daemon joins (or rejoins after a restart) with its tiers and inventory
        (single node: the master keeps the daemon's membership lease)."""
        if self.clustered:
            raise BadRequest("this master runs in cluster mode: daemons join through etcd; "
                             "start the daemon with --etcd (and --cluster) instead of --master")
        node_id, metadata = str(body.get("node_id", "")), body.get("metadata")
        if not isinstance(metadata, bytes):
            raise BadRequest("registration needs the daemon's NIXL agent metadata (bytes)")
        old = self.nodes.get(node_id)
        if old is not None and old.agent == body.get("agent"):  # a retried registration
            await self.coord.keepalive(old.lease)
            return {"lease": old.lease, "ttl_s": self.cfg.node_ttl_s}
        if old is not None and await self._alive(old):
            raise BadRequest(f"node id {node_id!r} is already in the pool (at {old.url}); "
                             "give this daemon another node_id")
        node = await self.join(body, None)
        node.lease = await self.coord.grant_lease(self.cfg.node_ttl_s)
        await self.coord.put(f"{self.prefix}nodes/{node_id}", node.agent.encode(), node.lease)
        # Published under the node's lease: it vanishes with the node, never outlives it.
        await self.coord.put(f"{self.prefix}nixl/{node.agent}", metadata, node.lease)
        return {"lease": node.lease, "ttl_s": self.cfg.node_ttl_s}

    async def join(self, body: dict[str, Any], link: RpcClient | None) -> Node:
        """Take a node into the index: its tiers, and every block of its inventory."""
        node_id = str(body.get("node_id", ""))
        if not node_id:
            raise BadRequest("registration needs a node_id")
        try:
            url, agent = str(body["url"]), str(body["agent"])
        except (KeyError, TypeError) as exc:
            raise BadRequest(f"registration is missing {exc}") from None
        tiers = parse_tiers(body.get("tiers"), self.cfg.alignment)
        old = self.nodes.get(node_id)
        if old is not None:
            if old.agent == agent:
                if link is not None:
                    await link.close()
                return old
            await self.drop_node(node_id, "replaced by a restarted daemon")
        for kind, space in list(tiers.items()):
            if space.store:
                shared = self.stores.setdefault(f"@{space.store}", space)
                shared.capacity = max(shared.capacity, space.capacity)
                tiers[kind] = shared
        node = Node(node_id, url, agent, tiers,
                    link or RpcClient(url, timeout_s=30.0, path="/v1/d/rpc"))
        for item in body.get("inventory", []):
            self._adopt_inventory(node, item)
        self.nodes[node_id] = node
        log.info("node %s joined: %s, %d blocks", node_id, url, len(body.get("inventory", [])))
        return node

    def _adopt_inventory(self, node: Node, item: Any) -> None:
        try:
            key = parse_key(item["key"])
            tier = TierKind(item["tier"])
            location, size, header_raw = int(item["location"]), int(item["size"]), bytes(item["header"])
            header, _ = BlockHeader.decode(header_raw)
        except (KeyError, TypeError, ValueError, KVPoolError) as exc:
            log.warning("node %s reported a bad inventory item: %s", node.node_id, exc)
            return
        space = node.tiers.get(tier)
        if space is None:
            return
        owner = self.owner(node, tier)
        entry = self.index.get(key)
        if entry is None:
            entry = BlockEntry(key, header.payload_size, BlockState.COMPLETE, [], header_raw)
            self.index.add(entry)
        elif entry.state is not BlockState.COMPLETE or entry.replica(owner, tier):
            return
        if space.allocator is not None:
            space.allocator.reserve_at(location, size)
        else:
            space.cold_used += size
        self.index.add_replica(entry, Replica(owner, tier, location, size))

    async def _alive(self, node: Node) -> bool:
        link = RpcClient(node.url, timeout_s=1.0, path="/v1/d/rpc")
        try:
            info = await link.call("health")
        except KVPoolError:
            return False
        finally:
            await link.close()
        return isinstance(info, dict) and info.get("agent") == node.agent

    async def heartbeat(self, node_id: str, agent: str) -> None:
        if self.clustered:
            raise BadRequest("this master runs in cluster mode: daemons renew their etcd lease")
        node = self.nodes.get(node_id)
        if node is None or node.agent != agent:
            raise NodeGone(f"node {node_id} is not a member; register again")
        try:
            await self.coord.keepalive(node.lease)
        except LeaseExpired:
            await self.drop_node(node_id, "membership lease expired")
            raise NodeGone(f"node {node_id}'s lease expired; register again") from None

    async def agent_metadata(self, agents: list[str]) -> dict[str, bytes]:
        """NIXL metadata of live daemons' agents, as published through the coordinator."""
        found = {}
        for agent in agents:
            meta = await self.coord.get(f"{self.prefix}nixl/{agent}")
            if meta is not None:
                found[agent] = meta
        return found

    async def watch_membership(self) -> None:
        """Drop a node the moment its membership key disappears (lease expiry)."""
        watch = await self.coord.watch_prefix(f"{self.prefix}nodes/")
        try:
            async for event in watch:
                if event.kind is EventKind.DELETE:
                    node_id = event.key.rsplit("/", 1)[-1]
                    await self.drop_node(node_id, "membership lease expired")
        finally:
            await watch.aclose()

    async def drop_node(self, node_id: str, reason: str) -> None:
        node = self.nodes.pop(node_id, None)
        if node is None:
            return
        lost = 0
        for entry in self.index.on(node_id):
            for r in [r for r in entry.replicas if r.node == node_id]:
                self.index.drop_replica(entry, r)
            if not entry.replicas:
                self.index.remove(entry)
                self.events.emit("removed", entry.key, node_id)
                lost += 1
        await node.link.close()
        log.warning("node %s left the pool (%s); %d blocks had no other replica", node_id, reason, lost)

    # -- two-phase put --------------------------------------------------------------------

    async def reserve(self, keys: list[BlockKey], sizes: list[int], parents: list[bytes | None],
                      prefer: str | None, replicas: int = 1) -> tuple[int, list[list[Any]]]:
        """Reserve space for new blocks: ``[NEW, *location, *more locations]`` per new key,
        one location per copy (``replicas`` copies on distinct nodes, as many as there are
        nodes with room), ``[EXISTS]`` or ``[IN_FLIGHT]`` for the others."""
        if not isinstance(replicas, int) or not 1 <= replicas <= 16:
            raise BadRequest(f"replicas={replicas!r} is outside 1..16")
        if len(keys) != len(sizes) or (parents and len(parents) != len(keys)):
            raise BadRequest("keys, sizes and parents must have the same length")
        if len(set(keys)) != len(keys):
            raise BadRequest("a batch names the same key twice")
        for size in sizes:
            if not isinstance(size, int) or not 0 < size <= self.cfg.max_block_bytes:
                raise BadRequest(f"block size {size!r} is outside 1..{self.cfg.max_block_bytes} bytes")
        if not self.nodes:
            raise TierFull("no pool daemon has joined; start one with `kvpool daemon` or `kvpool up`")
        put_id, deadline = self._new_put_id(), time.monotonic() + self.cfg.put_timeout_s
        out: list[list[Any]] = []
        made: list[BlockEntry] = []
        try:
            for i, (key, size) in enumerate(zip(keys, sizes)):
                entry = self.index.get(key)
                if entry is not None:
                    out.append([EXISTS if entry.state is BlockState.COMPLETE else IN_FLIGHT,
                                len(entry.replicas)])
                    continue
                node, space, offset = await self._allocate(size, prefer)
                parent = parents[i] if parents else None
                entry = BlockEntry(key, size, BlockState.PENDING,
                                   [Replica(node.node_id, space.kind, offset, size)],
                                   put_id=put_id, deadline=deadline, parent=parent)
                self.index.add(entry)
                made.append(entry)
                for other, other_space in extra_replica_spaces(self.nodes.values(), node.node_id,
                                                               replicas - 1):
                    if len(entry.replicas) == replicas:
                        break
                    at = other_space.allocator.allocate(size)  # type: ignore[union-attr]
                    if at is not None:
                        self.index.add_replica(entry, Replica(other.node_id, other_space.kind, at, size))
                out.append([NEW, *self.location(entry.replicas[0]),
                            *[list(self.location(r)) for r in entry.replicas[1:]]])
        except BaseException:
            for entry in made:  # roll back, then raise
                self._discard_pending(entry)
            raise
        self.counters["reserved"] += len(made)
        return put_id, out

    async def _allocate(self, size: int, prefer: str | None) -> tuple[Node, TierSpace, int]:
        largest = max((s.capacity for _, s in arena_candidates(self.nodes.values())), default=0)
        if size > largest:  # no amount of demotion would make room: say so, move nothing
            raise TierFull(f"a {size}-byte block is larger than every arena (largest "
                           f"{largest} bytes); give the daemon a bigger host arena")
        idle = 0
        for _attempt in range(64):
            candidates = arena_candidates(self.nodes.values(), prefer)
            for node, space in candidates:
                offset = space.allocator.allocate(size)  # type: ignore[union-attr]
                if offset is not None:
                    return node, space, offset
            if not candidates or idle >= 2:
                break
            # A relief that moves nothing may have waited on another one that freed space
            # meanwhile, so only two idle rounds in a row mean there is no room.
            moved = await self.relieve(candidates[0][0], candidates[0][1].kind, need=size,
                                       at_least=size)
            idle = 0 if moved else idle + 1
        raise TierFull(f"no arena has room for a {size}-byte block and nothing more can be "
                       "demoted (blocks are leased, pinned or in flight); release leases, "
                       "unpin blocks or give the daemon a bigger host arena")

    def _discard_pending(self, entry: BlockEntry) -> None:
        if self.index.get(entry.key) is not entry or entry.state is not BlockState.PENDING:
            return
        self.index.remove(entry)
        for r in entry.replicas:
            node = self.nodes.get(r.node)
            if node is not None and (alloc := node.tiers[r.tier].allocator) is not None:
                alloc.free(r.location)

    async def commit(self, put_id: int, keys: list[BlockKey], headers: list[bytes]) -> int:
        """Make reserved blocks visible once their daemon has recorded them."""
        if len(keys) != len(headers):
            raise BadRequest("commit needs one header per key")
        if put_id >> 32 != self.term:
            raise ReservationLost("this put was reserved by a master that is no longer leader; "
                                  "its reservation is gone, put again")
        entries = []
        for key in keys:
            entry = self.index.get(key)
            if entry is None or entry.state is not BlockState.PENDING or entry.put_id != put_id:
                self.abort(put_id, keys)
                raise BadRequest(f"block {key.hex()} has no reservation under this put "
                                 "(it expired and was reclaimed, or belongs to another writer)")
            entries.append(entry)
        for entry, raw in zip(entries, headers):
            try:
                header, used = BlockHeader.decode(raw)
                if used != len(raw) or header.payload_size != entry.size:
                    raise BadRequest(f"header says {header.payload_size} bytes, "
                                     f"{entry.size} were reserved")
            except BadRequest as exc:
                self.abort(put_id, keys)
                raise BadRequest(f"block {entry.key.hex()}: {exc}") from None
        hold = time.monotonic() + self.cfg.put_timeout_s
        by_node: dict[str, list[tuple[BlockEntry, Replica, bytes]]] = defaultdict(list)
        for entry, raw in zip(entries, headers):
            entry.deadline = hold  # the reclaim sweep must not race the daemon's adopt
            for r in entry.replicas:
                by_node[r.node].append((entry, r, raw))
        adopted: list[tuple[str, list[tuple[BlockEntry, Replica, bytes]]]] = []
        for node_id, items in by_node.items():
            node = self.nodes.get(node_id)
            try:
                if node is None:
                    raise Unavailable(f"node {node_id} left")
                await node.link.call("adopt", {
                    "keys": [e.key for e, _, _ in items],
                    "tiers": [r.tier.value for _, r, _ in items],
                    "locations": [r.location for _, r, _ in items],
                    "headers": [h for _, _, h in items]})
                adopted.append((node_id, items))
            except KVPoolError as exc:
                for done_id, done in adopted:  # roll back: no daemon keeps a block nobody indexes
                    for tier in {r.tier for _, r, _ in done}:
                        await self._drop_on_daemon(done_id, tier,
                                                   [e.key for e, r, _ in done if r.tier is tier])
                self.abort(put_id, keys)
                raise NodeGone(f"node {node_id} could not record the blocks: {exc}") from None
        committed = 0
        for entry, raw in zip(entries, headers):
            if self.index.get(entry.key) is entry and entry.state is BlockState.PENDING:
                entry.state, entry.header, entry.put_id = BlockState.COMPLETE, raw, 0
                self.index.touch(entry)
                for r in entry.replicas:
                    self.events.emit("stored", entry.key, r.node, r.tier, entry.size)
                committed += 1
        self.counters["committed"] += committed
        return committed

    def abort(self, put_id: int, keys: list[BlockKey]) -> None:
        for key in keys:
            entry = self.index.get(key)
            if entry is not None and entry.state is BlockState.PENDING and entry.put_id == put_id:
                self._discard_pending(entry)

    def reclaim(self, now: float) -> int:
        """Free reservations whose writer never committed (it died mid-put)."""
        stale = [e for e in self.index.entries.values()
                 if e.state is BlockState.PENDING and e.deadline <= now]
        for entry in stale:
            self._discard_pending(entry)
        if stale:
            log.info("reclaimed %d abandoned reservations", len(stale))
            self.counters["reclaimed"] += len(stale)
        return len(stale)

    # -- reads ----------------------------------------------------------------------------

    def release(self, lease_ids: list[int]) -> None:
        for lease in lease_ids:
            _, keys = self._leases.pop(lease, (0.0, []))
            for key in keys:
                entry = self.index.get(key)
                if entry is not None:
                    entry.leases.pop(lease, None)

    def expire_leases(self, now: float) -> None:
        self.release([lease for lease, (expiry, _) in self._leases.items() if expiry <= now])

    async def get(self, keys: list[BlockKey]) -> tuple[int, list[list[Any] | None]]:
        """Locations of complete blocks under one new read lease; cold ones promoted first."""
        lease = self._new_id()
        now = time.monotonic()
        expiry = now + self.cfg.read_lease_s
        out: list[list[Any] | None] = [None] * len(keys)
        cold: list[int] = []
        leased: list[BlockKey] = []
        for i, key in enumerate(keys):
            entry = self.index.complete(key)
            if entry is None:
                continue
            best = entry.best()
            if best is None:
                continue
            entry.leases[lease] = expiry  # taken before any await: nothing may move it now
            leased.append(key)
            if best.tier.is_arena:
                self.index.touch(entry)
                out[i] = [*self.location(best), entry.header]
            else:
                cold.append(i)
        if leased:
            self._leases[lease] = (expiry, leased)
        if cold:
            await self._promote_many(keys, cold, lease, out)
        self.counters["get_hits"] += sum(x is not None for x in out)
        self.counters["get_misses"] += sum(x is None for x in out)
        return lease, out

    async def _promote_many(self, keys: list[BlockKey], idx: list[int], lease: int,
                            out: list[list[Any] | None]) -> None:
        results = await asyncio.gather(*(self.promote(keys[i]) for i in idx),
                                       return_exceptions=True)
        for i, res in zip(idx, results):
            entry = self.index.get(keys[i])
            if isinstance(res, Replica) and entry is not None:
                self.index.touch(entry)
                out[i] = [*self.location(res), entry.header]
            else:
                if isinstance(res, BaseException) and not isinstance(res, KVPoolError):
                    raise res
                if entry is not None:
                    entry.leases.pop(lease, None)

    async def promote(self, key: BlockKey) -> Replica | None:
        """Copy a cold block into its node's host arena (the checksum is verified on the way)."""
        entry = self.index.complete(key)
        if entry is None:
            return None
        while entry.moving:
            await asyncio.sleep(0.002)
            if self.index.get(key) is not entry:
                return None
        best = entry.best()
        if best is None or best.tier.is_arena:
            return best
        node = self._node_for(best.node)
        if node is None:  # a shared store no live node names now: a miss until one does
            return None
        space = node.tiers.get(TierKind.HOST)
        if space is None or space.allocator is None:
            raise TierFull(f"node {node.node_id} has no host arena to promote into")
        entry.moving = True
        try:
            offset = space.allocator.allocate(entry.size)
            if offset is None:
                await self.relieve(node, TierKind.HOST, need=entry.size)
                offset = space.allocator.allocate(entry.size)
                if offset is None:
                    raise TierFull("the host arena is full of leased or pinned blocks")
            try:
                res = await node.link.call("copy", {
                    "keys": [key], "src": best.tier.value, "dst": TierKind.HOST.value,
                    "locations": [offset]})
            except BaseException:
                space.allocator.free(offset)
                raise
            status = res["status"][0]
            if status != "ok" or self.index.get(key) is not entry:
                if status == "ok":  # removed meanwhile: the copy goes before its space is reused
                    await self._drop_on_daemon(node.node_id, TierKind.HOST, [key])
                space.allocator.free(offset)
                if status in ("corrupt", "missing") and self.index.get(key) is entry:
                    self._lose_replica(entry, best, status)
                return None
            replica = Replica(node.node_id, TierKind.HOST, offset, entry.size)
            self.index.add_replica(entry, replica)
            self.counters["promoted"] += 1
            return replica
        finally:
            entry.moving = False

    def _lose_replica(self, entry: BlockEntry, replica: Replica, why: str) -> None:
        log.warning("block %s on %s/%s is %s; dropped", entry.key.hex(), replica.node,
                    replica.tier.value, why)
        self._forget_replica(entry, replica)
        self.counters[f"dropped_{why}"] += 1
        if not entry.replicas:
            self.index.remove(entry)
            self.events.emit("removed", entry.key, replica.node, replica.tier)

    def _forget_replica(self, entry: BlockEntry, replica: Replica) -> None:
        """Index bookkeeping only; the caller made sure the daemon no longer holds it."""
        self.index.drop_replica(entry, replica)
        space = self._space(replica.node, replica.tier)
        if space is None:
            return
        if space.allocator is not None:
            space.allocator.free(replica.location)
        else:
            space.cold_used = max(0, space.cold_used - replica.size)

    async def report_corrupt(self, keys: list[BlockKey], nodes: list[str]) -> None:
        """A client read bytes that failed their checksum: drop that replica."""
        for key, node_id in zip(keys, nodes):
            entry = self.index.complete(key)
            replica = entry.best() if entry else None
            if entry is None or replica is None or replica.node != node_id:
                continue
            await self._drop_on_daemon(node_id, replica.tier, [key])
            self._lose_replica(entry, replica, "corrupt")

    def exists(self, keys: list[BlockKey]) -> list[bool]:
        return [self.index.complete(k) is not None for k in keys]

    def match(self, keys: list[BlockKey]) -> int:
        for n, key in enumerate(keys):
            if self.index.complete(key) is None:
                return n
        return len(keys)

    # -- removal and pins -----------------------------------------------------------------

    async def remove(self, keys: list[BlockKey], force: bool) -> list[bool]:
        now = time.monotonic()
        entries = [self.index.complete(k) for k in keys]
        if not force:
            for entry in entries:
                if entry is not None and (entry.pins or entry.leased(now)):
                    raise BlockLeased(f"block {entry.key.hex()} is "
                                      f"{'pinned' if entry.pins else 'leased by a reader'}; "
                                      "retry later or remove with force")
        await self._delete([e for e in entries if e is not None and self.index.get(e.key) is e])
        return [e is not None for e in entries]

    async def _delete(self, entries: list[BlockEntry]) -> None:
        """Invisible first; then the daemons forget the bytes; then the space is free again."""
        unique = {entry.key: entry for entry in entries}.values()
        doomed = [(entry, list(entry.replicas)) for entry in unique]
        by_place: dict[tuple[str, TierKind], list[BlockKey]] = defaultdict(list)
        for entry, replicas in doomed:
            self.index.remove(entry)
            for r in replicas:
                by_place[(r.node, r.tier)].append(entry.key)
        for (node_id, tier), keys in by_place.items():
            await self._drop_on_daemon(node_id, tier, keys)
        for entry, replicas in doomed:
            for r in replicas:
                space = self._space(r.node, r.tier)
                if space is not None:
                    if space.allocator is not None:
                        space.allocator.free(r.location)
                    else:
                        space.cold_used = max(0, space.cold_used - r.size)
                self.events.emit("removed", entry.key, r.node, r.tier, r.size)
        self.counters["removed"] += len(doomed)

    async def _drop_on_daemon(self, node_id: str, tier: TierKind, keys: list[BlockKey]) -> None:
        node = self._node_for(node_id)
        if node is None:
            if node_id.startswith("@"):
                log.warning("no live node names store %s; %d blocks stay in it", node_id[1:], len(keys))
            return
        try:
            await node.link.call("drop", {"keys": keys, "tier": tier.value})
        except KVPoolError as exc:  # the daemon overwrites stale arena records on adopt
            log.warning("node %s did not confirm dropping %d blocks: %s", node_id, len(keys), exc)

    def pin(self, keys: list[BlockKey], delta: int) -> None:
        entries = [self.index.complete(k) for k in keys]
        for key, entry in zip(keys, entries):
            if entry is None:
                raise BlockNotFound(f"no complete block {key.hex()}")
        for entry in entries:
            entry.pins = max(0, entry.pins + delta)  # type: ignore[union-attr]

    # -- invariants -----------------------------------------------------------------------

    async def check(self) -> dict[str, int]:
        """Verify the index against itself, the allocators and every daemon's inventory;
        AssertionError names the first discrepancy. Tests call it after mutations."""
        self.index.check()
        held: dict[tuple[str, TierKind], list[Replica]] = defaultdict(list)
        for entry in self.index.entries.values():
            for r in entry.replicas:
                held[(r.node, r.tier)].append(r)
        checked = 0
        for node in list(self.nodes.values()):
            inventory = (await node.link.call("inventory"))["inventory"]
            shared = {k.value for k, s in node.tiers.items() if s.store}
            reported = {(bytes(i["key"]), i["tier"]): i for i in inventory if i["tier"] not in shared}
            for kind, space in node.tiers.items():
                if space.store:
                    continue  # checked once per store below
                replicas = held.get((node.node_id, kind), [])
                if space.allocator is not None:
                    space.allocator.check()
                    align = space.allocator.alignment
                    expected = sum(-(-r.size // align) * align for r in replicas)
                    assert space.allocator.used == expected, (
                        f"{node.node_id}/{kind.value}: allocator holds {space.allocator.used} "
                        f"bytes, the index's replicas {expected}")
                else:
                    assert space.cold_used == sum(r.size for r in replicas), (
                        f"{node.node_id}/{kind.value}: {space.cold_used} bytes counted, "
                        f"replicas hold {sum(r.size for r in replicas)}")
            for entry in self.index.entries.values():
                for r in entry.replicas:
                    if r.node != node.node_id or entry.state is not BlockState.COMPLETE:
                        continue
                    item = reported.pop((entry.key, r.tier.value), None)
                    assert item is not None, (f"{entry.key.hex()} is indexed on "
                                              f"{node.node_id}/{r.tier.value}, which lacks it")
                    assert item["location"] == r.location, f"{entry.key.hex()}: location differs"
                    checked += 1
            pending = {e.key for e in self.index.entries.values() if e.state is BlockState.PENDING}
            stray = [k for k, t in reported if k not in pending]
            assert not stray, (f"{node.node_id} holds {len(stray)} blocks the index does not "
                               f"know, e.g. {stray[0].hex()}")
        for owner, space in self.stores.items():
            replicas = held.get((owner, TierKind.OBJECT), [])
            assert space.cold_used == sum(r.size for r in replicas), (
                f"store {owner[1:]}: {space.cold_used} bytes counted, replicas hold "
                f"{sum(r.size for r in replicas)}")
            checked += len(replicas)
        return {"replicas_checked": checked}

    # -- pressure -------------------------------------------------------------------------

    async def sweep(self) -> None:
        now = time.monotonic()
        self.reclaim(now)
        self.expire_leases(now)
        for node, kind in pressured(list(self.nodes.values()), self.cfg.high_watermark):
            await self.relieve(node, kind)

    async def relieve(self, node: Node, kind: TierKind, need: int = 0, at_least: int = 0) -> bool:
        """Demote (or, at the last tier, evict) the coldest movable blocks of one tier until
        it is below its low watermark (and ``need`` bytes fit), freeing at least
        ``at_least`` bytes (a fragmented arena may need more than its fill suggests).
        True when anything moved."""
        owner = self.owner(node, kind)
        async with self._relieving[(owner, kind)]:
            space = node.tiers.get(kind)
            if space is None or self.nodes.get(node.node_id) is not node:
                return False
            target = max(0, min(relief_target(space, self.cfg.low_watermark, need),
                                space.used - at_least))
            now = time.monotonic()
            victims, freed = [], 0
            for entry in self.index.coldest(owner, kind):
                if space.used - freed <= target:
                    break
                if entry.movable(now):
                    victims.append(entry)
                    freed += entry.replica(owner, kind).size  # type: ignore[union-attr]
            if not victims:
                return False
            await self.demote(node, kind, victims)
            return True

    async def demote(self, node: Node, kind: TierKind, entries: list[BlockEntry],
                     batch: int = 64) -> None:
        """Move blocks one tier down on their node; at the last tier, evict them."""
        dst = node.below(kind)
        for start in range(0, len(entries), batch):
            chunk = entries[start:start + batch]
            for e in chunk:
                e.moving = True
            try:
                if dst is None:
                    moved = chunk
                else:
                    moved = await self._copy_down(node, kind, dst, chunk)
                await self._drop_replicas(node, kind, moved)
            finally:
                for e in chunk:
                    e.moving = False

    async def _copy_down(self, node: Node, src: TierKind, dst: TierKind,
                         entries: list[BlockEntry]) -> list[BlockEntry]:
        """Copy to ``dst`` the blocks that have no replica at ``dst`` or below yet."""
        dst_owner = self.owner(node, dst)
        need = [e for e in entries if not any(r.node in (node.node_id, dst_owner)
                                              and r.tier.rank >= dst.rank for r in e.replicas)]
        done = [e for e in entries if e not in need]
        if need:
            dst_space = node.tiers[dst]
            estimate = sum(e.size for e in need)
            if dst_space.used + estimate > self.cfg.high_watermark * dst_space.capacity:
                await self.relieve(node, dst, need=estimate)
            try:
                res = await node.link.call("copy", {
                    "keys": [e.key for e in need], "src": src.value, "dst": dst.value,
                    "locations": [0] * len(need)})
            except KVPoolError as exc:
                log.warning("demotion %s->%s on %s failed: %s", src.value, dst.value, node.node_id, exc)
                return done
            for entry, status, size in zip(need, res["status"], res["sizes"]):
                if self.index.get(entry.key) is not entry:
                    await self._drop_on_daemon(node.node_id, dst, [entry.key])
                elif status == "ok":
                    dst_space.cold_used += size
                    self.index.add_replica(entry, Replica(dst_owner, dst, 0, size))
                    done.append(entry)
                elif status in ("corrupt", "missing"):
                    replica = entry.replica(node.node_id, src)
                    if replica is not None:
                        self._lose_replica(entry, replica, status)
            self.counters[f"demoted_{src.value}"] += len(need)
        return done

    async def _drop_replicas(self, node: Node, kind: TierKind, entries: list[BlockEntry]) -> None:
        """Forget the ``kind`` replica of blocks nobody is reading; evict lone ones."""
        now = time.monotonic()
        owner = self.owner(node, kind)
        drop = [e for e in entries if self.index.get(e.key) is e and not e.leased(now)
                and not e.pins and e.replica(owner, kind) is not None]
        if not drop:
            return
        await self._drop_on_daemon(owner, kind, [e.key for e in drop])
        for entry in drop:
            replica = entry.replica(owner, kind)
            if replica is None:
                continue
            self._forget_replica(entry, replica)
            if not entry.replicas:
                self.index.remove(entry)
                self.events.emit("removed", entry.key, node.node_id, kind, entry.size)
                self.counters["evicted"] += 1
