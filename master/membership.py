"""Which daemons are in the pool, and what the index knows because of them.

A node joins with its registration (tiers, NIXL metadata) and its inventory, read in
pages of one snapshot, and leaves
the moment its membership key is gone: its replicas leave the index at once, so no get
returns a location on a dead node. Without etcd, daemons register with the master, which
keeps their leased keys in the in-process coordinator. With etcd, daemons own their keys
(kvpool.membership) and the leader follows them: it lists them, pulls each daemon's
registration, is ready once every listed daemon is in, then follows changes; a broken
watch starts over with a full listing, so nothing that happened meanwhile is missed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import aclosing
from typing import Any, Callable, Sequence

from kvpool.codec import BlockHeader
from kvpool.coordinator import Coordinator, EventKind, WatchEvent
from kvpool.daemon_link import (ArenaRegion, DaemonLink, PinMark, Registration, RpcDaemonLink, StoredBlock,
                                inventory_pages, probe)
from kvpool.auth import client_tls, membership_proof_ok, secret
from kvpool.errors import (BadRequest, KVPoolError, LeaseExpired, NodeGone, NodeIdTaken, NotLeader,
                           Unauthorized, Unavailable)
from kvpool.keys import BlockKey
from kvpool.keyspace import Keyspace
from kvpool.kv_events import Reason
from kvpool.tiers.base import TierKind
from master.index import BlockEntry, BlockState, Replica
from master.nodes import Node, tier_spaces
from master.state import PoolState

log = logging.getLogger(__name__)
# Inventory items taken in between two yields of the loop: some 0.1 s of work on a loaded
# machine, so a join of millions of blocks never starves the leader's lease keepalive.
ADOPT_AT_ONCE = 1000
EVENT_KEYS = 1000  # block keys in one BlockRemoved of a node that left
LinkFactory = Callable[[str], DaemonLink]


class Membership:
    def __init__(self, state: PoolState, coord: Coordinator, clustered: bool,
                 connect: LinkFactory | None = None) -> None:
        self.state = state
        self.coord = coord
        self.keys = Keyspace(state.cfg.cluster)
        self.clustered = clustered  # with etcd: daemons join through it, never by `register`
        # The cluster credential: the master presents it to daemons, and a daemon's etcd
        # key must carry its proof before the master connects (and presents it) there.
        self._token = secret(state.cfg.cluster_token, "[master] cluster_token")
        self._tls = client_tls(state.cfg.tls_ca, "[master] tls_ca")
        # A link carries the leader generation of the term it was made in (links go with it).
        self.connect = connect or (lambda url: RpcDaemonLink(url, token=self._token, tls=self._tls,
                                                             generation=state.generation))

    # -- joining and leaving --------------------------------------------------------------

    async def join(self, reg: Registration, link: DaemonLink | None = None) -> Node:
        """Take a node into the index: its tiers, and every block of its inventory.

        The inventory comes in pages (a node may hold millions of blocks) of one snapshot,
        taken in as they come while the daemon packs the next, ADOPT_AT_ONCE blocks at a
        time, yielding the loop in between; a daemon failing midway leaves nothing behind
        (what was taken in is forgotten). Meanwhile the node is ``joining``: its blocks
        can be read, but nothing is placed on it (its allocators do not hold every extent
        yet) until it is a member."""
        st = self.state
        old = st.nodes.get(reg.node_id)
        if old is not None:
            if old.agent == reg.agent:
                if link is not None:
                    await link.close()
                return old
            await self.drop(reg.node_id, "replaced by a restarted daemon")
        if reg.node_id in st.joining:
            if link is not None:
                await link.close()
            raise Unavailable(f"node {reg.node_id} is being taken in; register again shortly")
        tiers = tier_spaces(reg.tiers, st.cfg.alignment, st.tenancy.shares)
        for kind, space in list(tiers.items()):
            if space.store:
                shared = st.stores.setdefault(f"@{space.store}", space)
                shared.capacity = max(shared.capacity, space.capacity)
                tiers[kind] = shared
        node = Node(reg.node_id, reg.url, reg.agent, tiers, link or self.connect(reg.url),
                    ttl_s=reg.ttl_s, metadata=reg.metadata)
        epoch = st.epoch
        st.joining[reg.node_id] = node
        try:
            if st.tenancy.shares:
                await self._cut_regions(node)
            blocks = pages = 0
            async with aclosing(inventory_pages(node.link, st.cfg.inventory_page)) as listing:
                async for page in listing:
                    marks = {m.key: m for m in page.marks}
                    for start in range(0, len(page.blocks), ADOPT_AT_ONCE):
                        await asyncio.sleep(0)  # other calls (the leader's lease among them)
                        if not st.current(epoch):
                            raise NotLeader(f"the term ended while node {reg.node_id} was taken in")
                        self._adopt(node, page.blocks[start:start + ADOPT_AT_ONCE], marks)
                    blocks, pages = blocks + len(page.blocks), pages + 1
        except BaseException:
            if st.current(epoch):
                st.joining.pop(reg.node_id, None)
                self._forget(reg.node_id)  # pages taken in before a cancellation
            await node.link.close()
            raise
        st.joining.pop(reg.node_id, None)
        st.nodes[reg.node_id] = node
        log.info("node %s joined: %s, %d blocks in %d page(s)", reg.node_id, reg.url, blocks,
                 pages)
        return node

    async def _cut_regions(self, node: Node) -> None:
        """Have the daemon register each tenant's region with NIXL on its own, before any
        client can be sent to it, and keep the metadata each region's clients get."""
        layout = node.layout()
        answer = await node.link.regions([ArenaRegion(kind, r.name, r.offset, r.size)
                                          for kind, r in layout])
        node.metadata = answer.metadata
        for (_, r), blob in zip(layout, answer.regions):
            node.region_metadata.setdefault(r.name, []).append(blob)

    def _adopt(self, node: Node, blocks: Sequence[StoredBlock], marks: dict[BlockKey, PinMark]) -> None:
        """Take a chunk of inventory items in. Per block only what is its own: each tier's
        extents are reserved in one pass, and the events go out one per chained run (as
        vLLM's BlockStored lists a prefix), not one per block."""
        st, index = self.state, self.state.index
        now = time.monotonic()
        # Each candidate: (block, its entry, whether that entry is new to the index).
        taken: dict[TierKind, list[tuple[StoredBlock, BlockEntry, bool]]] = {}
        fresh: dict[BlockKey, BlockEntry] = {}
        listed: set[tuple[BlockKey, TierKind]] = set()  # an item listed twice counts once
        for block in blocks:
            try:
                header, _ = BlockHeader.decode(block.header)
            except KVPoolError as exc:
                log.warning("node %s reported a bad inventory item: %s", node.node_id, exc)
                continue
            if block.tier not in node.tiers:
                continue
            entry = index.get(block.key)
            new = entry is None
            if new:
                entry = fresh.get(block.key)
            if entry is None:
                scope, parent = st.tenancy.rebuilt(header)
                entry = fresh[block.key] = BlockEntry(
                    block.key, header.payload_size, BlockState.COMPLETE, [], block.header,
                    parent=parent, scope=scope)
            elif not entry.state.readable or entry.replica(st.owner(node, block.tier), block.tier) \
                    or (block.key, block.tier) in listed:
                continue
            listed.add((block.key, block.tier))
            taken.setdefault(block.tier, []).append((block, entry, new))
        for kind, items in taken.items():
            owner = st.owner(node, kind)
            refused = set(node.tiers[kind].take_many([(b.location, b.size) for b, _, _ in items]))
            for n in sorted(refused):  # it straddles a region of a changed layout: not taken in
                b = items[n][0]
                log.warning("node %s: block %s at %d in %s is not taken in: not free in the "
                            "master's view of the arena", node.node_id, b.key.hex(), b.location,
                            kind.value)
            adopted: list[BlockEntry] = []
            added: list[BlockEntry] = []  # new to the index: added at once, after the loop
            for n, (block, entry, new) in enumerate(items):
                if n in refused:
                    continue
                replica = Replica(owner, kind, block.location, block.size)
                if new and not entry.replicas:
                    entry.replicas.append(replica)
                    added.append(entry)
                else:
                    index.add_replica(entry, replica)
                    entry.wanted = max(entry.wanted, len({r.node for r in entry.replicas
                                                          if not r.node.startswith("@")}))
                self._inherit(entry, marks.get(block.key), now)
                adopted.append(entry)
            index.add_many(added, now)
            st.announce(((owner, kind, e) for e in adopted), Reason.INVENTORY)

    def _inherit(self, entry: BlockEntry, mark: PinMark | None, now: float) -> None:
        """The leases and pins a block held under the former leader (or this one, before
        it resumed)."""
        st = self.state
        if now < st.inherited_until:  # leases the former leader may have granted on it
            entry.inherit(st.inherited_until)
        elif st.carried:  # this master's own, from before it resumed
            carried = st.carried.get(entry.key)
            if carried:
                entry.leases.update(carried)
        if mark is not None:  # its pins, as the former leader had them recorded here
            entry.pins = max(entry.pins, mark.pins)
            if entry.pins:
                self.state.index.pinned_now(entry)
            if mark.soft_until > time.time():
                entry.soft_until = max(entry.soft_until, now + mark.soft_until - time.time())

    async def drop(self, node_id: str, reason: str) -> None:
        st = self.state
        node = st.nodes.pop(node_id, None)
        if node is None:
            return
        lost = self._forget(node_id)
        await node.link.close()
        log.warning("node %s left the pool (%s); %d blocks had no other replica", node_id, reason, lost)

    def _forget(self, node_id: str) -> int:
        """Take a node's replicas out of the index; returns how many blocks had no other."""
        st = self.state
        lost = 0
        gone: dict[tuple[TierKind, str], list[BlockKey]] = {}  # the events, EVENT_KEYS a piece
        for entry in st.index.on(node_id):
            for r in [r for r in entry.replicas if r.node == node_id]:
                st.index.drop_replica(entry, r)
                keys = gone.setdefault((r.tier, entry.scope), [])
                keys.append(entry.shown)
                if len(keys) == EVENT_KEYS:
                    st.events.removed(keys, node_id, r.tier, Reason.LOST, scope=entry.scope)
                    gone[(r.tier, entry.scope)] = []
            if not entry.replicas:
                st.index.remove(entry)
                lost += 1
            elif entry.wanted > 1:
                st.short.add(entry.key)
        for (tier, scope), keys in gone.items():
            if keys:
                st.events.removed(keys, node_id, tier, Reason.LOST, scope=scope)
        return lost

    def agent_metadata(self, agents: list[str], region: str | None = None) -> dict[str, list[bytes]]:
        """NIXL metadata of live daemons' agents: of their whole arenas (``region`` None,
        for the master's own copies and callers that see the whole pool), else of that
        arena region only (master.regions). No names: every live daemon's."""
        by_agent = {n.agent: n for n in self.state.nodes.values()}
        found = {}
        for agent in agents or list(by_agent):
            node = by_agent.get(agent)
            if node is not None and (blobs := node.metadata_for(region)):
                found[agent] = blobs
        return found

    # -- without etcd: daemons register with the master -----------------------------------

    async def register(self, reg: Registration) -> dict[str, Any]:
        """A daemon joins (or rejoins after a restart); the master keeps its leased key."""
        if self.clustered:
            raise BadRequest("this master runs in cluster mode: daemons join through etcd; "
                             "start the daemon with --etcd (and --cluster) instead of --master")
        old = self.state.nodes.get(reg.node_id)
        if old is not None and old.agent == reg.agent:  # a retried registration
            await self.coord.keepalive(old.lease)
            return {"lease": old.lease, "ttl_s": old.ttl_s}
        if old is not None and await probe(old.url, old.agent, token=self._token, tls=self._tls):
            raise NodeIdTaken(f"node id {reg.node_id!r} is already in the pool (at {old.url}); "
                              "give this daemon another node_id")
        node = await self.join(reg)
        node.lease = await self.coord.grant_lease(reg.ttl_s)
        await self.coord.put(self.keys.node(reg.node_id), json.dumps(
            {"url": reg.url, "agent": reg.agent}).encode(), node.lease)
        return {"lease": node.lease, "ttl_s": reg.ttl_s}

    async def heartbeat(self, node_id: str, agent: str) -> None:
        if self.clustered:
            raise BadRequest("this master runs in cluster mode: daemons renew their etcd lease")
        node = self.state.nodes.get(node_id)
        if node is None or node.agent != agent:
            raise NodeGone(f"node {node_id} is not a member; register again")
        try:
            await self.coord.keepalive(node.lease)
        except LeaseExpired:
            await self.drop(node_id, "membership lease expired")
            raise NodeGone(f"node {node_id}'s lease expired; register again") from None

    async def watch(self) -> None:
        """Single node: drop a node the moment its key disappears (its lease expired)."""
        watch = await self.coord.watch_prefix(self.keys.nodes)
        try:
            async for event in watch:
                if event.kind is EventKind.DELETE:
                    await self.drop(self.keys.node_id(event.key), "membership lease expired")
        finally:
            await watch.aclose()

    # -- with etcd: the leader follows the daemons' keys ----------------------------------

    async def _pull(self, node_id: str, value: bytes, rebuilding: bool) -> None:
        """Take the daemon a membership key describes into the index (if not in already)."""
        info = json.loads(value)
        known = self.state.nodes.get(node_id)
        if known is not None and known.agent == info.get("agent"):
            return
        if self._token and not membership_proof_ok(self._token, node_id, info):
            raise Unauthorized(f"the etcd key of node {node_id} lacks a valid proof of the "
                               "cluster credential: not taken in (is a daemon running without "
                               "the cluster_token, or did someone else write that key?)")
        link = self.connect(str(info["url"]))
        try:
            # The first node of a rebuild lists a shared object store again, so blocks that
            # nodes gone since demoted there are found.
            reg = await link.registration(rescan=rebuilding and not self.state.stores)
            if reg.agent != info.get("agent") or reg.node_id != node_id:
                raise KVPoolError(f"{info['url']} is no longer the daemon {node_id} that etcd lists")
        except BaseException:
            await link.close()
            raise
        await self.join(reg, link)

    async def _sync(self, rebuilding: bool) -> tuple[set[str], float]:
        """Make the index's nodes the listed ones: drop the unlisted, pull the new. Returns
        the listed nodes that could not be pulled (not answering yet, or dying) and the
        longest membership TTL listed."""
        prefix = self.keys.nodes
        listed = {self.keys.node_id(k): v for k, v in (await self.coord.get_prefix(prefix)).items()}
        for node_id in list(self.state.nodes):
            if node_id not in listed:
                await self.drop(node_id, "membership lease expired")
        missing, ttl = set(), 0.0
        for node_id, value in listed.items():
            try:
                ttl = max(ttl, float(json.loads(value).get("ttl_s", 0.0)))
                await self._pull(node_id, value, rebuilding)
            except (KVPoolError, ValueError, KeyError, TypeError) as exc:
                log.warning("cannot pull node %s yet: %s", node_id, exc)
                missing.add(node_id)
        return missing, ttl

    async def follow(self, ready: Callable[[], None]) -> None:
        """Run while leading: rebuild, call ``ready``, then follow membership changes.

        The rebuild waits for every listed daemon, or for its key to go (a daemon that
        died just before keeps its key until its lease runs out), at most its TTL + 2 s;
        a daemon still missing then is pulled again every 2 s while the leader serves."""
        loop = asyncio.get_running_loop()
        rebuilding = True
        while True:
            watch = None
            pending: asyncio.Task[WatchEvent] | None = None
            try:
                watch = await self.coord.watch_prefix(self.keys.nodes)
                events = watch.__aiter__()
                missing, ttl = await self._sync(rebuilding)
                if rebuilding:
                    end = loop.time() + ttl + 2.0
                    while missing and loop.time() < end:
                        await asyncio.sleep(0.2)
                        missing, _ = await self._sync(rebuilding)
                    if missing:
                        log.error("serving without node(s) %s, which are listed but do not answer",
                                  ", ".join(sorted(missing)))
                    rebuilding = False
                    ready()
                    log.info("index rebuilt from %d nodes: %d blocks; serving",
                             len(self.state.nodes), len(self.state.index))
                while True:
                    # The next event is awaited by a task of its own: cancelling a watch's
                    # iterator mid-wait would end it, so a timeout only stops our waiting.
                    if pending is None:
                        pending = asyncio.create_task(events.__anext__())  # type: ignore[arg-type]
                    done, _ = await asyncio.wait({pending}, timeout=2.0 if missing else None)
                    if not done:
                        missing, _ = await self._sync(rebuilding)
                        continue
                    event, pending = pending.result(), None
                    await self._on_event(event, missing)
            except (KVPoolError, StopAsyncIteration) as exc:
                log.warning("membership watch ended: %s; listing again", exc or type(exc).__name__)
            finally:
                if pending is not None:
                    pending.cancel()
                if watch is not None:
                    await watch.aclose()
            await asyncio.sleep(0.2)

    async def _on_event(self, event: WatchEvent, missing: set[str]) -> None:
        node_id = self.keys.node_id(event.key)
        if event.kind is EventKind.DELETE:
            missing.discard(node_id)
            await self.drop(node_id, "membership lease expired")
            return
        known = self.state.nodes.get(node_id)
        if event.value is None or (known is not None and _agent(event.value) == known.agent):
            return
        try:
            await self._pull(node_id, event.value, rebuilding=False)
            missing.discard(node_id)
        except (KVPoolError, ValueError, KeyError, TypeError) as exc:
            log.warning("cannot pull node %s: %s; trying again", node_id, exc)
            missing.add(node_id)


def _agent(value: bytes) -> str:
    try:
        return str(json.loads(value)["agent"])
    except (ValueError, KeyError, TypeError):
        return ""
