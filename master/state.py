"""The pool state every room of the master operates on: the index, the nodes and shared
stores with their space, the event log and the counters, plus the bookkeeping that keeps
them consistent with each other.

Everything runs on one asyncio loop, so updates between awaits are atomic. Daemons are
told about a block before the index shows it, and forget it before its space is handed
out again (drop, then free), so the index never points at bytes that are not there.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from kvpool import heap
from kvpool.config import MasterConfig
from kvpool.daemon_link import PinMark, whole_inventory
from kvpool.errors import ConfigError, KVPoolError, NodeGone
from kvpool.keys import BlockKey
from kvpool.protocol import Location
from kvpool.tiers.base import TierKind
from kvpool.kv_events import EventHub, Reason
from master.index import BlockEntry, BlockState, Index, Replica
from master.nodes import Node, TierSpace
from master.policy import POLICIES, EvictionPolicy, PolicyFactory
from master.regions import COMMON
from master.tenants import UNKNOWN, Tenancy

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Unsettled:
    """Arena space a call with an unknown outcome may have written (PoolState.free_later)."""

    at: float  # monotonic time after which the call surely ended
    node: Node
    kind: TierKind
    items: list[tuple[BlockKey, int, int]]  # key, offset, size
    size: int  # bytes held, aligned


def _continues(last: BlockEntry, entry: BlockEntry) -> bool:
    """Does ``entry`` extend the run of STORED events that ends with ``last``? It chains
    from it and says the same of itself (scope, tokens per block, token ids or not)."""
    a, b = last.meta, entry.meta
    return (entry.shown_parent == last.shown and entry.scope == last.scope
            and (a is None) == (b is None)
            and (a is None or (a.block_tokens == b.block_tokens  # type: ignore[union-attr]
                               and (a.token_ids is None) == (b.token_ids is None))))  # type: ignore[union-attr]


class PoolState:
    def __init__(self, cfg: MasterConfig) -> None:
        self.cfg = cfg
        if cfg.policy not in POLICIES:
            raise ConfigError(f"[master] policy {cfg.policy!r} is not one of {', '.join(sorted(POLICIES))}")
        self.policies: PolicyFactory = POLICIES[cfg.policy]()
        self.index = Index(self._make_policy)
        self.nodes: dict[str, Node] = {}
        # Nodes whose inventory is being taken in (master.membership.join): their blocks
        # are readable, nothing is placed on them yet.
        self.joining: dict[str, Node] = {}
        # Shared object stores by owner id ("@" + store): their replicas belong to no node,
        # so a node's death leaves them, and any node naming the store can promote them.
        self.stores: dict[str, TierSpace] = {}
        self.events = EventHub(max(1, cfg.events_ring))
        self.tenancy = Tenancy(cfg)
        self.counters: dict[str, int] = defaultdict(int)
        # Keys whose drop a daemon is carrying out right now (the index may already have
        # forgotten them): check() does not count them as strays.
        self.dropping: Counter[BlockKey] = Counter()
        # Arena and cold bytes held outside the index: replicas being forgotten (retire),
        # space a call with an unknown outcome may still write (free_later), copies
        # planned (master.replication). check() counts them as held.
        self.freeing: Counter[tuple[str, TierKind]] = Counter()
        self.unsettled: list[Unsettled] = []  # space of calls whose outcome is unknown
        self.diverging: set[str] = set()  # nodes to reconcile with the index (reconcile)
        # Blocks that lost a copy and may be below their replica count (master.replication).
        self.short: set[BlockKey] = set()
        self.rng = random.SystemRandom()
        self.term = self.rng.getrandbits(30) | 1  # tags put ids: a new leader knows foreign ones
        self.generation = 0  # the term's leader generation (master.election); 0: not fenced
        # Changes whenever the state is cleared or a term begins (a same-process re-lead
        # reuses this object): work that awaited across a change must not touch what it
        # finds here, which belongs to another term (``current``).
        self.epoch = 0
        # Whether this master's leadership lease surely holds (MasterCore sets it).
        self.sure: Callable[[], bool] = lambda: True
        # Until then every block taken in from an inventory counts as leased: a reader of
        # the former leader may hold a lease (at most read_lease_s long) this one never saw.
        self.inherited_until = 0.0
        # In a term that resumes this master's own (no other master led since): the keys
        # its readers may still hold leases on, with their ends; taken in with the blocks.
        self.carried: dict[BlockKey, dict[int, float]] = {}  # key -> lease -> expiry

    def _make_policy(self, owner: str, kind: TierKind) -> EvictionPolicy:
        space = self.space(owner, kind)
        return self.policies.make(kind.value, space.capacity if space is not None else 0)

    def clear(self) -> None:
        """Forget everything (a term ended); the caller closes the nodes' links."""
        self.policies.close()
        heap.thaw()  # whatever else of the term is left in cycles goes at the next full collection
        self.policies = POLICIES[self.cfg.policy]()
        self.index = Index(self._make_policy)
        self.nodes = {}
        self.joining = {}
        self.stores = {}
        self.short = set()
        self.freeing = Counter()
        self.unsettled = []
        self.diverging = set()
        self.epoch += 1

    def new_term(self, carried: dict[BlockKey, dict[int, float]] | None = None,
                 generation: int = 0) -> None:
        """``carried``: this master leads again on its own lease, and these are the leases
        it granted (Leases.in_force): they protect what they cover; nothing else is leased
        beyond what a former leader's readers may still hold (``inherited_until`` stays).
        ``generation``: the term's leader generation, which the links to daemons carry."""
        self.term = self.rng.getrandbits(30) | 1
        self.generation = generation
        self.epoch += 1
        self.carried = carried or {}
        if carried is None:  # a term after another master's: any block may be leased
            self.inherited_until = time.monotonic() + self.cfg.read_lease_s

    def current(self, epoch: int) -> bool:
        """Is the state still the one of ``epoch`` (taken before an await)?"""
        return self.epoch == epoch

    async def leading(self, epoch: int, wait_s: float = 30.0) -> bool:
        """Before telling a daemon to record or forget blocks after an await: the term of
        ``epoch`` is current and its leadership lease surely holds. A leader paused
        meanwhile (SIGSTOP) must not act on daemons another leader serves now: while its
        lease is in doubt this waits for the election to settle it (the term ends, or
        the lease is renewed)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + wait_s
        while self.current(epoch) and not self.sure():
            if loop.time() > end:
                return False
            await asyncio.sleep(0.05)
        return self.current(epoch)

    def new_id(self) -> int:
        return self.rng.getrandbits(63) | 1

    # -- owners of replicas: nodes, and shared object stores ------------------------------

    @staticmethod
    def owner(node: Node, kind: TierKind) -> str:
        """Who a replica in ``node``'s tier ``kind`` belongs to: the node, or its shared store."""
        space = node.tiers.get(kind)
        return f"@{space.store}" if space is not None and space.store else node.node_id

    def space(self, owner: str, kind: TierKind) -> TierSpace | None:
        if owner.startswith("@"):
            return self.stores.get(owner)
        node = self.nodes.get(owner)
        return node.tiers.get(kind) if node is not None else None

    def node_for(self, owner: str) -> Node | None:
        """The live node that acts for an owner: itself, or for a store the node naming it
        with the most free host arena (one that is not draining first)."""
        if not owner.startswith("@"):
            return self.nodes.get(owner)
        users = [n for n in self.nodes.values() if self.owner(n, TierKind.OBJECT) == owner]
        return max(users, key=lambda n: (n.state.accepts, n.tiers[TierKind.HOST].free
                                         if TierKind.HOST in n.tiers else -1), default=None)

    def best(self, entry: BlockEntry) -> Replica | None:
        """The replica a reader should use: the fastest tier, on a node that is not
        draining when one holds a copy (so reads leave a draining node as copies land)."""
        if len(entry.replicas) <= 1:
            return entry.best()

        def rank(r: Replica) -> tuple[bool, int]:
            node = self.nodes.get(r.node)
            return (node is not None and not node.state.accepts, r.tier.rank)

        return min(entry.replicas, key=rank)

    def region(self, entry: BlockEntry) -> str:
        """The arena region (master.regions) an entry's copies go to: its scope's; for a
        block rebuilt from an inventory (scope unknown), the region a copy of it is in."""
        if entry.scope != UNKNOWN:
            return self.tenancy.region_of(entry.scope)
        for r in entry.replicas:
            space = self.space(r.node, r.tier)
            if space is not None and space.allocator is not None:
                return space.allocator.region_at(r.location).name
        return COMMON

    def location(self, replica: Replica) -> Location:
        node = self.nodes.get(replica.node) or self.joining.get(replica.node)
        if node is None:  # it left, or this master stepped down, while the caller waited
            raise NodeGone(f"node {replica.node} is no longer in the pool")
        space = node.tiers[replica.tier]
        return Location(node.node_id, node.agent, space.address + replica.location,
                        replica.size, space.mem_type, space.device)

    # -- bookkeeping ----------------------------------------------------------------------

    def free(self, owner: str, replica: Replica) -> None:
        """Give a replica's space back (arena bytes or a cold tier's count)."""
        space = self.space(owner, replica.tier)
        if space is not None:
            space.release(replica.location, replica.size)

    def forget_replica(self, entry: BlockEntry, replica: Replica) -> None:
        """Index bookkeeping only; the caller made sure the daemon no longer holds it."""
        self.index.drop_replica(entry, replica)
        self.free(replica.node, replica)

    def announce(self, placed: Iterable[tuple[str, TierKind, BlockEntry]], reason: Reason) -> None:
        """STORED events for blocks newly held in (owner, tier): one per run of chained
        blocks there (vLLM's BlockStored carries a chain), so a 1000-block put or an
        inventory page is an event or a few, not a thousand; token ids, when the writer
        sent them, ride along."""
        runs: dict[tuple[str, TierKind], list[BlockEntry]] = {}
        for owner, tier, entry in placed:
            run = runs.get((owner, tier))
            if run is not None and not _continues(run[-1], entry):
                self._stored(run, owner, tier, reason)
                run = None
            if run is None:
                runs[(owner, tier)] = [entry]
            else:
                run.append(entry)
        for (owner, tier), run in runs.items():
            self._stored(run, owner, tier, reason)

    def _stored(self, run: list[BlockEntry], owner: str, tier: TierKind, reason: Reason) -> None:
        first = run[0]
        meta = first.meta
        tokens = None if meta is None or meta.token_ids is None else \
            [t for e in run for t in e.meta.token_ids]  # type: ignore[union-attr]
        self.events.stored([e.shown for e in run], owner, tier, reason,
                           parent=first.shown_parent, scope=first.scope,
                           block_size=meta.block_tokens if meta else None, token_ids=tokens)

    def lose_replica(self, entry: BlockEntry, replica: Replica, why: KVPoolError) -> None:
        """A replica's bytes are bad or gone (the daemon said so): forget it; a block with
        no replica left is gone."""
        log.warning("block %s on %s/%s dropped: %s", entry.key.hex(), replica.node,
                    replica.tier.value, why)
        self.forget_replica(entry, replica)
        self.counters[f"dropped_{why.code}"] += 1
        self.events.removed([entry.shown], replica.node, replica.tier, Reason.LOST,
                            scope=entry.scope)
        if not entry.replicas:
            self.index.remove(entry)
        elif entry.wanted > 1:
            self.short.add(entry.key)

    def discard_pending(self, entry: BlockEntry) -> None:
        """Undo a reservation nobody committed: out of the index, its arena space free."""
        if entry.state is not BlockState.PENDING:
            return
        self.index.remove(entry)
        for r in entry.replicas:
            self.free(r.node, r)

    @staticmethod
    def pin_mark(entry: BlockEntry) -> PinMark:
        """A block's pins as the daemons keep them (a soft pin's end in wall-clock time)."""
        left = entry.soft_until - time.monotonic()
        return PinMark(entry.key, entry.pins, time.time() + left if left > 0 else 0.0)

    async def mark_on_daemons(self, entries: Sequence[BlockEntry]) -> None:
        """Tell every node holding a replica of these blocks their pins as they are now
        (a shared store's replicas: the node acting for it). Raises the first node's
        error; the others are still told."""
        by_node: dict[str, list[BlockEntry]] = defaultdict(list)
        for entry in entries:
            for owner in {r.node for r in entry.replicas}:
                node = self.node_for(owner)
                if node is not None:
                    by_node[node.node_id].append(entry)
        failed: KVPoolError | None = None
        epoch = self.epoch
        for node_id, here in by_node.items():
            node = self.nodes.get(node_id)
            if node is None or not self.current(epoch):
                continue  # gone, or the term ended: the next term's nodes are not told
            try:
                await node.link.mark([self.pin_mark(e) for e in {id(e): e for e in here}.values()])
            except KVPoolError as exc:
                log.warning("node %s did not record the pins of %d blocks: %s", node_id, len(here), exc)
                failed = failed or exc
        if failed is not None:
            raise failed

    def free_later(self, node: Node, kind: TierKind, items: Sequence[tuple[BlockKey, int, int]],
                   after_s: float) -> None:
        """Arena space (``(key, offset, size)`` items) that a daemon may still write into
        and record, after a call that filled it failed with its outcome unknown (the link
        broke or timed out; the daemon may be frozen with the call in hand). Not free at
        once, where a new block would be written over: ``settle`` drops what the daemon
        may have recorded and frees the space once the call's deadline surely passed."""
        space = node.tiers[kind]
        if space.allocator is None or not items:
            return
        align = space.allocator.alignment
        size = sum(-(-n // align) * align for _, _, n in items)
        self.freeing[(node.node_id, kind)] += size
        self.unsettled.append(Unsettled(time.monotonic() + after_s, node, kind, list(items), size))
        self.counters["frees_deferred"] += len(items)

    async def settle(self, now: float) -> None:
        """Free the space of calls whose outcome was unknown and whose deadline passed
        (``free_later``), once their daemon forgot what it may have recorded there."""
        due = [u for u in self.unsettled if u.at <= now]
        if not due:
            return
        epoch = self.epoch
        self.unsettled = [u for u in self.unsettled if u.at > now]
        for u in due:
            if not self.current(epoch):
                return
            if self.nodes.get(u.node.node_id) is not u.node:
                continue  # it left: its space went with it
            stray = [key for key, _, _ in u.items if (e := self.index.get(key)) is None
                     or e.replica(u.node.node_id, u.kind) is None]
            if stray:
                await self.drop_on_daemon(u.node.node_id, u.kind, stray)
            if not self.current(epoch) or self.nodes.get(u.node.node_id) is not u.node:
                continue
            self.freeing[(u.node.node_id, u.kind)] -= u.size
            for _, at, _ in u.items:
                u.node.tiers[u.kind].allocator.free(at)  # type: ignore[union-attr]

    def diverged(self, node_id: str, why: KVPoolError) -> None:
        """A daemon refused an arena placement the index thought free (an overlap, no
        room): it holds records the index forgot (a drop it could not confirm, a call
        whose answer was lost). The next sweep reconciles that node (``reconcile``)."""
        if node_id not in self.diverging:
            log.warning("node %s holds arena records the index lacks (%s); reconciling", node_id, why)
        self.diverging.add(node_id)

    async def reconcile(self, busy: Callable[[], set[BlockKey]]) -> int:
        """Have each diverging node forget the arena blocks the index does not hold there
        (keys in flight, ``busy``, set aside), so that its records and the allocators agree
        again; returns how many went."""
        dropped, epoch = 0, self.epoch
        for node_id in sorted(self.diverging):
            self.diverging.discard(node_id)
            node = self.nodes.get(node_id)
            if node is None:
                continue
            before = busy()
            try:
                inventory = await whole_inventory(node.link, self.cfg.inventory_page)
            except KVPoolError as exc:
                log.warning("cannot reconcile node %s: %s", node_id, exc)
                continue
            if not self.current(epoch) or self.nodes.get(node_id) is not node:
                return dropped
            skip = before | busy()
            stray: dict[TierKind, list[BlockKey]] = defaultdict(list)
            for b in inventory:
                space = node.tiers.get(b.tier)
                if space is None or space.allocator is None or b.key in skip:
                    continue
                entry = self.index.get(b.key)
                if entry is None or entry.replica(node_id, b.tier) is None:
                    stray[b.tier].append(b.key)
            for tier, keys in stray.items():
                if await self.leading(epoch):
                    await self.drop_on_daemon(node_id, tier, keys)
                    dropped += len(keys)
            if dropped:
                log.warning("node %s forgot %d arena blocks the index did not hold", node_id, dropped)
        self.counters["reconciled"] += dropped
        return dropped

    async def retire(self, owner: str, tier: TierKind, items: Sequence[tuple[BlockEntry, Replica]]) -> bool:
        """Take replicas of one owner's tier away: out of the index first (no get is granted
        them from here on), then the daemon forgets them, then their space is free. False
        when the term ended meanwhile: the space then belongs to a new term's index, which
        rebuilt it from the inventories, and nothing more is touched."""
        space = self.space(owner, tier)
        align = space.allocator.alignment if space is not None and space.allocator is not None else 1
        epoch, size = self.epoch, sum(-(-r.size // align) * align for _, r in items)
        for entry, replica in items:
            self.index.drop_replica(entry, replica)
        self.freeing[(owner, tier)] += size
        try:
            if await self.leading(epoch):
                await self.drop_on_daemon(owner, tier, [e.key for e, _ in items])
            elif self.current(epoch) and not owner.startswith("@"):
                self.diverged(owner, KVPoolError("a drop was not sent: leadership in doubt"))
        finally:
            if self.current(epoch):
                self.freeing[(owner, tier)] -= size
        if not self.current(epoch):
            return False
        for _, replica in items:
            self.free(owner, replica)
        return True

    async def drop_on_daemon(self, owner: str, tier: TierKind, keys: Sequence[BlockKey]) -> None:
        """Tell the node (or a node naming the store) to forget blocks. The arena records
        of a daemon that does not confirm are reconciled by a later sweep (``reconcile``)."""
        node = self.node_for(owner)
        if node is None:
            if owner.startswith("@"):
                log.warning("no live node names store %s; %d blocks stay in it", owner[1:], len(keys))
            return
        self.dropping.update(keys)
        try:
            await node.link.drop(tier, keys)
        except KVPoolError as exc:
            log.warning("node %s did not confirm dropping %d blocks: %s", owner, len(keys), exc)
            if tier.is_arena and not owner.startswith("@"):
                self.diverged(owner, exc)
        finally:
            self.dropping.subtract(keys)
            for key in keys:
                if self.dropping[key] <= 0:
                    del self.dropping[key]
