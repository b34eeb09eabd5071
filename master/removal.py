"""Removing blocks: invisible first, then the daemons forget the bytes, then the space is
handed out again, so no reader or writer ever meets a half-removed block."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Sequence

from kvpool.errors import BlockLeased
from kvpool.keys import BlockKey
from kvpool.tiers.base import TierKind
from master.catalog import matches
from kvpool.kv_events import Reason
from master.index import BlockEntry, BlockState
from master.state import PoolState


async def remove(state: PoolState, keys: Sequence[BlockKey], force: bool) -> list[bool]:
    """Remove stored blocks; leased or pinned ones only with ``force`` (BlockLeased
    otherwise, and then nothing is removed). Returns, per key, whether it was there."""
    now = time.monotonic()
    entries = [state.index.readable(k) for k in keys]
    if not force:
        for entry in entries:
            if entry is not None and (entry.pins or entry.leased(now)):
                raise BlockLeased(f"block {entry.key.hex()} is "
                                  f"{'pinned' if entry.pins else 'leased by a reader'}; "
                                  "retry later or remove with force")
    await delete(state, [e for e in entries if e is not None and e.state is not BlockState.REMOVED])
    return [e is not None for e in entries]


async def delete(state: PoolState, entries: Sequence[BlockEntry], reason: Reason = Reason.REMOVED,
                 announce: bool = True) -> None:
    """Remove blocks from every tier and node; ``announce``: a BlockRemoved per replica
    (a purge of the whole pool says AllBlocksCleared once instead)."""
    unique = {entry.key: entry for entry in entries}.values()
    doomed = [(entry, list(entry.replicas)) for entry in unique]
    by_place: dict[tuple[str, TierKind], list[BlockKey]] = defaultdict(list)
    for entry, replicas in doomed:
        state.index.remove(entry)
        for r in replicas:
            by_place[(r.node, r.tier)].append(entry.key)
    for (owner, tier), keys in by_place.items():
        await state.drop_on_daemon(owner, tier, keys)
    for entry, replicas in doomed:
        for r in replicas:
            state.free(r.node, r)
            if announce:
                state.events.removed([entry.shown], r.node, r.tier, reason, scope=entry.scope)
    if reason is Reason.REMOVED:
        state.counters["removed"] += len(doomed)


async def purge(state: PoolState, namespaces: frozenset[BlockKey], models: frozenset[str],
                everything: bool) -> int:
    """Remove every block of the named namespaces or models (or every block) from every
    tier and node, leased and pinned ones too: an operator's purge outranks a reader.
    Returns how many blocks went. Purging everything says AllBlocksCleared once."""
    entries = [e for e in state.index.entries.values() if e.state.readable
               and (everything or matches(e.meta, namespaces, models))]
    await delete(state, entries, Reason.PURGED, announce=not everything)
    if everything:
        state.events.cleared(Reason.PURGED)
    state.counters["purged"] += len(entries)
    return len(entries)
