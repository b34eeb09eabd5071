"""Placement decisions as pure functions: where a new block goes, what pressure to relieve."""

from __future__ import annotations

from typing import Callable, Iterable

from kvpool.tiers.base import TIER_ORDER, TierKind
from master.nodes import Node, TierSpace


def arena_candidates(nodes: Iterable[Node], prefer: str | None = None
                     ) -> list[tuple[Node, TierSpace]]:
    """Arenas a new block may go to, best first: fastest tier, then the preferred node,
    then the most free bytes. A draining node takes no new blocks."""
    out = []
    for node in nodes:
        if not node.state.accepts:
            continue
        for space in node.tiers.values():
            if space.allocator is not None and space.capacity:
                out.append((node, space))
    out.sort(key=lambda ns: (ns[1].kind.rank, ns[0].node_id != prefer,
                             -(ns[1].capacity - ns[1].used)))
    return out


def extra_replica_spaces(nodes: Iterable[Node], first: str, n: int
                         ) -> list[tuple[Node, TierSpace]]:
    """Where the copies after the first go: one arena per node other than ``first``,
    each node's best one, nodes with the most free bytes first; all of them (the caller
    takes the first ``n`` that have room), so fewer than ``n`` means fewer nodes."""
    if n <= 0:
        return []
    best: dict[str, tuple[Node, TierSpace]] = {}
    for node, space in arena_candidates(nodes):
        if node.node_id != first and node.node_id not in best:
            best[node.node_id] = (node, space)
    return sorted(best.values(), key=lambda ns: (ns[1].kind.rank, -(ns[1].capacity - ns[1].used)))


def over_high(space: TierSpace, high: float) -> bool:
    return space.capacity > 0 and space.used > high * space.capacity


def relief_target(space: TierSpace, low: float, need: int = 0) -> int:
    """Use the tier should come down to: the low watermark, or lower if ``need`` bytes
    must fit."""
    return max(0, min(int(low * space.capacity), space.capacity - need))


def pressured(nodes: Iterable[Node], high: Callable[[TierKind], float]) -> list[tuple[Node, TierKind]]:
    """Every (node, tier) above its tier's high watermark, fastest tiers first."""
    out = []
    for node in nodes:
        for kind in TIER_ORDER:
            space = node.tiers.get(kind)
            if space is not None and over_high(space, high(kind)):
                out.append((node, kind))
    return out
