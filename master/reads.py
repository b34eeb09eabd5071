"""The read path: leased gets (cold blocks promoted first), exists, prefix match (with
prefetch: the matched cold blocks start moving to a host arena at once, so the get that
follows finds them hot), and reports of replicas that failed their checksum at a reader."""

from __future__ import annotations

import asyncio
import logging
from typing import Sequence

from kvpool.errors import ChecksumMismatch, KVPoolError, NodeGone
from kvpool.keys import BlockKey
from kvpool.protocol import ReadGrant
from kvpool.tasks import TaskOwner
from master.index import BlockEntry, Replica
from master.leases import Leases
from master.state import PoolState
from master.tiering import Tiering

log = logging.getLogger(__name__)
PREFETCH_AT_ONCE = 64  # promotions a prefetch runs concurrently
LOOKUPS_AT_ONCE = 4096  # index lookups between yields to the loop in exists and match


class Reads:
    def __init__(self, state: PoolState, leases: Leases, tiering: Tiering) -> None:
        self.state = state
        self.leases = leases
        self.tiering = tiering
        self._prefetching = TaskOwner("prefetch")

    async def clear(self) -> None:
        """Stop every prefetch in flight (a term ended, the master stops)."""
        done, self._prefetching = self._prefetching, TaskOwner("prefetch")
        await done.cancel()

    def _grant(self, entry: BlockEntry, replica: Replica) -> ReadGrant:
        self.state.index.touch(entry)
        return ReadGrant(self.state.location(replica), entry.header)

    async def get(self, keys: Sequence[BlockKey]) -> tuple[int, list[ReadGrant | KVPoolError | None]]:
        """Where to read each stored block, under one new read lease: a grant, None for a
        miss, or for a block still stored that cannot be read now the typed error saying
        why (its cold copy cannot be promoted, its node left meanwhile)."""
        st = self.state
        found: list[tuple[int, BlockEntry, Replica]] = []
        for i, key in enumerate(keys):
            entry = st.index.readable(key)
            best = st.best(entry) if entry is not None else None
            if entry is not None and best is not None:
                found.append((i, entry, best))
        lease = self.leases.grant([e for _, e, _ in found])
        out: list[ReadGrant | KVPoolError | None] = [None] * len(keys)
        cold = []
        for i, entry, best in found:
            st.counters[f"get_hits_{best.tier.value}"] += 1
            if best.tier.is_arena:
                out[i] = self._grant(entry, best)
            else:
                cold.append((i, entry))
        if cold:
            await self._promote(keys, cold, lease, out)
        hits = sum(isinstance(x, ReadGrant) for x in out)
        st.counters["get_hits"] += hits
        st.counters["get_misses"] += sum(x is None for x in out)
        st.counters["get_unreadable"] += len(keys) - hits - sum(x is None for x in out)
        return lease, out

    def keep(self, lease: int, key: BlockKey) -> float:
        """For a one-block get: how long its reader may keep the grant (master.leases)."""
        entry = self.state.index.readable(key)
        best = self.state.best(entry) if entry is not None else None
        if best is None or not best.tier.is_arena or lease not in entry.leases:  # type: ignore[union-attr]
            return 0.0
        return self.leases.keep(lease, best)

    async def _promote(self, keys: Sequence[BlockKey], cold: list[tuple[int, BlockEntry]],
                       lease: int, out: list[ReadGrant | KVPoolError | None]) -> None:
        results = await asyncio.gather(*(self.tiering.promote(keys[i]) for i, _ in cold),
                                       return_exceptions=True)
        for (i, entry), res in zip(cold, results):
            if isinstance(res, BaseException) and not isinstance(res, KVPoolError):
                raise res
            if isinstance(res, Replica) and entry.state.readable:
                try:
                    out[i] = self._grant(entry, res)
                    continue
                except NodeGone as exc:  # it left while the others were promoted
                    res = exc
            entry.leases.pop(lease, None)
            if isinstance(res, KVPoolError) and entry.state.readable and entry.replicas:
                out[i] = res  # stored, but not readable now: why, not a plain miss

    async def exists(self, keys: Sequence[BlockKey]) -> list[bool]:
        """Which keys are stored; a long batch yields the loop between chunks."""
        index = self.state.index
        out: list[bool] = []
        for start in range(0, len(keys), LOOKUPS_AT_ONCE):
            if start:
                await asyncio.sleep(0)
            out += index.present(keys[start:start + LOOKUPS_AT_ONCE])
        return out

    async def match(self, keys: Sequence[BlockKey], prefetch: bool = False) -> int:
        """How many leading keys are stored: the reusable prefix of a prompt. With
        ``prefetch``, the matched blocks that are only in cold tiers start their promotion.
        A long batch yields the loop between chunks."""
        index = self.state.index
        n = 0
        cold = []
        for start in range(0, len(keys), LOOKUPS_AT_ONCE):
            if start:
                await asyncio.sleep(0)
            found = index.prefix(keys[start:start + LOOKUPS_AT_ONCE])
            n += len(found)
            if prefetch:
                cold += [e.key for e in found
                         if (best := e.best()) is not None and not best.tier.is_arena]
            if len(found) < LOOKUPS_AT_ONCE:
                break
        self.state.counters["match_hits"] += n
        self.state.counters["match_misses"] += len(keys) - n
        if cold:
            self._prefetching.spawn(self._prefetch(cold), name="prefetch")
            self.state.counters["prefetched"] += len(cold)
        return n

    async def _prefetch(self, keys: list[BlockKey]) -> None:
        for start in range(0, len(keys), PREFETCH_AT_ONCE):
            chunk = keys[start:start + PREFETCH_AT_ONCE]
            results = await asyncio.gather(*(self.tiering.promote(k) for k in chunk),
                                           return_exceptions=True)
            for key, res in zip(chunk, results):
                if isinstance(res, BaseException) and not isinstance(res, KVPoolError):
                    log.error("prefetch of %s failed", key.hex(), exc_info=res)

    async def report_corrupt(self, keys: Sequence[BlockKey], nodes: Sequence[str]) -> None:
        """A reader got bytes that failed their checksum: drop the replica it was sent to,
        an arena replica on that node (readers are sent to nothing else; a cold copy there
        is another copy, verified when it is promoted, and stays)."""
        st = self.state
        for key, node_id in zip(keys, nodes):
            entry = st.index.readable(key)
            here = [r for r in entry.replicas if r.node == node_id and r.tier.is_arena] if entry else []
            if entry is None or not here:
                continue  # gone, or moved off that node's arenas since
            replica = min(here, key=lambda r: r.tier.rank)
            epoch = st.epoch
            await st.drop_on_daemon(node_id, replica.tier, [key])
            if st.current(epoch) and replica in entry.replicas:
                st.lose_replica(entry, replica, ChecksumMismatch("a reader's checksum failed"))
