"""Read leases and pins: what keeps a replica where it is.

A get takes one lease over every block it returns; until the reader releases it (riding
on its next call) or it expires, no replica of those blocks moves, is evicted or is
overwritten. A hard pin keeps a block in the pool until it is unpinned (counted: two
pins need two unpins); a soft pin with a TTL makes it the last to go until then. Both
can name a prefix: the block and every block it chains from.

Pins are recorded on the daemons that hold the blocks (kvpool.daemon_link.PinMark) before
a pin call returns, so a new leader finds them in the inventories it rebuilds from. Read
leases are not recorded: a new leader instead treats every block it takes in as leased
for the longest a lease can run (PoolState.inherited_until), so no block a reader of the
former leader may still be reading moves; releases of leases it never granted are no-ops.

A leader that leads again on the same etcd lease (a renewal failed, then went through)
knows every lease granted meanwhile, as no other master can have led: it keeps its own
table instead (PoolState.carried), so only the blocks really leased stay put. Treating
everything as leased there would freeze its arenas for a lease's length: no demotion, so
no room for puts, nor for promoting a cold block to read it.

A client may keep the grant of a hot block to read it again without a call
(clients.grants), holding its lease meanwhile; the master says which grants it may keep,
so that kept ones pin at most ``kept_grants_share`` of each arena and the rest of it
stays movable for puts and promotions (kept unbounded, they pinned half the host arenas
of a busy pool and puts found no room).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Sequence

from kvpool.errors import BadRequest, BlockNotFound, KVPoolError
from kvpool.keys import BlockKey
from kvpool.tiers.base import TierKind
from master.index import BlockEntry, Replica
from master.state import PoolState


class Leases:
    def __init__(self, state: PoolState) -> None:
        self.state = state
        self._held: dict[int, tuple[float, list[BlockKey]]] = {}  # lease -> expiry, keys
        # Leases a client may keep for a hot block: lease -> (node, tier, bytes), and their
        # bytes per node and tier.
        self._kept: dict[int, tuple[str, TierKind, int]] = {}
        self._kept_bytes: Counter[tuple[str, TierKind]] = Counter()
        # Pin calls record on the daemons one at a time, each sending the pins as they are
        # then, so the last record a daemon gets is the current one.
        self._recording = asyncio.Lock()

    def clear(self) -> None:
        self._held.clear()
        self._kept.clear()
        self._kept_bytes.clear()

    def in_force(self) -> dict[int, tuple[float, list[BlockKey]]]:
        """The leases not yet expired (handed to a term that resumes)."""
        now = time.monotonic()
        return {lease: held for lease, held in self._held.items() if held[0] > now}

    def resume(self, table: dict[int, tuple[float, list[BlockKey]]]) -> None:
        """Take back the leases of this master's previous term (PoolState.carried puts
        them on the blocks as they are taken in), so their releases and expiry work."""
        self._held = dict(table)

    def grant(self, entries: Sequence[BlockEntry]) -> int:
        """One new lease over ``entries``; taken before any await, so nothing moves them."""
        lease = self.state.new_id()
        expiry = time.monotonic() + self.state.cfg.read_lease_s
        for entry in entries:
            entry.leases[lease] = expiry
        if entries:
            self._held[lease] = (expiry, [e.key for e in entries])
        return lease

    def keep(self, lease: int, replica: Replica) -> float:
        """Seconds the reader may keep this one-block lease's grant to read the block
        again without a call (0: hand it back once read): at most half the lease (it was
        granted after the request left, on another clock), while the grants kept in that
        arena hold less than ``kept_grants_share`` of it."""
        space = self.state.space(replica.node, replica.tier)
        where = (replica.node, replica.tier)
        cap = self.state.cfg.kept_grants_share * (space.capacity if space is not None else 0)
        if lease not in self._held or lease in self._kept or \
                self._kept_bytes[where] + replica.size > cap:
            return 0.0
        self._kept[lease] = (replica.node, replica.tier, replica.size)
        self._kept_bytes[where] += replica.size
        return self.state.cfg.read_lease_s / 2

    @property
    def kept(self) -> int:
        return len(self._kept)

    def release(self, lease_ids: Sequence[int]) -> None:
        index = self.state.index
        for lease in lease_ids:
            kept = self._kept.pop(lease, None)
            if kept is not None:
                self._kept_bytes[kept[:2]] -= kept[2]
            _, keys = self._held.pop(lease, (0.0, []))
            for key in keys:
                entry = index.get(key)
                if entry is not None:
                    entry.drop_lease(lease)

    def expire(self, now: float) -> None:
        self.release([lease for lease, (expiry, _) in self._held.items() if expiry <= now])

    @property
    def held(self) -> int:
        return len(self._held)

    def leased_blocks(self, now: float) -> int:
        """Blocks under a read lease now: O(leases held), not O(index). Until the leases a
        former leader may have granted run out, every block taken in counts."""
        st = self.state
        if now < st.inherited_until:
            return st.index.readable_blocks
        entries = st.index.entries
        return len({k for expiry, keys in self._held.values() if expiry > now
                    for k in keys if k in entries})

    def _entries(self, keys: Sequence[BlockKey], prefix: bool) -> list[BlockEntry]:
        """The stored blocks named (and with ``prefix``, every block each chains from), or
        BlockNotFound naming the first key that is not stored."""
        index = self.state.index
        entries = []
        for key in keys:
            entry = index.readable(key)
            if entry is None:
                raise BlockNotFound(f"no complete block {key.hex()}")
            entries.extend(index.chain(entry) if prefix else [entry])
        return list({id(e): e for e in entries}.values())

    async def pin(self, keys: Sequence[BlockKey], ttl_s: float | None = None,
                  prefix: bool = False) -> int:
        """Pin every key (or none, if one is not stored). A hard pin (no ``ttl_s``) keeps a
        block until it is unpinned, once per pin; a soft pin keeps it for ``ttl_s`` seconds,
        evicted only after every unpinned block. Returns how many blocks were pinned, once
        the daemons holding them recorded it (if one cannot, the pin is undone and its
        error raised)."""
        if ttl_s is not None and not 0 < ttl_s <= 7 * 86400:
            raise BadRequest(f"a soft pin's ttl_s={ttl_s!r} is outside (0, 7 days]")
        entries = self._entries(keys, prefix)
        before = [(e.pins, e.soft_until) for e in entries]
        if ttl_s is not None:
            until = time.monotonic() + ttl_s
            for entry in entries:
                entry.soft_until = max(entry.soft_until, until)
        else:
            for entry in entries:
                entry.pins += 1
                self.state.index.pinned_now(entry)
        try:
            await self._record(entries)
        except BaseException:
            for entry, (pins, soft) in zip(entries, before):
                if ttl_s is None:
                    entry.pins = max(pins, entry.pins - 1)
                elif entry.soft_until == until:
                    entry.soft_until = soft
            await asyncio.shield(self._record_quietly(entries))
            raise
        return len(entries)

    async def unpin(self, keys: Sequence[BlockKey], prefix: bool = False) -> int:
        """Take back one hard pin and any soft pin of every key (recorded like a pin; a
        daemon that misses it keeps a stale pin only until the next pin call there)."""
        entries = self._entries(keys, prefix)
        for entry in entries:
            entry.pins = max(0, entry.pins - 1)
            entry.soft_until = 0.0
        await self._record(entries)
        return len(entries)

    async def _record(self, entries: Sequence[BlockEntry]) -> None:
        async with self._recording:
            await self.state.mark_on_daemons(entries)

    async def _record_quietly(self, entries: Sequence[BlockEntry]) -> None:
        try:
            await self._record(entries)
        except KVPoolError:
            pass  # already logged; the call raises the first error
