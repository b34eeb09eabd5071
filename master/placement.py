"""Placement decisions as pure functions: where a new block goes, what pressure to relieve."""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

from kvpool.tiers.base import TIER_ORDER, TierKind
from master.nodes import Node, TierSpace


def _arenas(nodes: Iterable[Node]) -> list[tuple[Node, TierSpace]]:
    """The arenas that take new blocks (a draining node takes none), in node order."""
    return [(node, space) for node in nodes if node.state.accepts
            for space in node.tiers.values() if space.allocator is not None and space.capacity]


def _order(node: Node, space: TierSpace, prefer: str | None) -> tuple[int, bool, int]:
    return space.kind.rank, node.node_id != prefer, space.used - space.capacity


def arena_candidates(nodes: Iterable[Node], prefer: str | None = None
                     ) -> list[tuple[Node, TierSpace]]:
    """Arenas a new block may go to, best first: fastest tier, then the preferred node,
    then the most free bytes."""
    return sorted(_arenas(nodes), key=lambda ns: _order(ns[0], ns[1], prefer))


class ArenaChoice:
    """``arena_candidates`` kept in order across the allocations of one batch: each
    allocation moves only the arena it took from (its free bytes fell), so a 1000-block
    reserve sorts once instead of 1000 times and places every block where a fresh sort
    would have. Valid while the caller does not yield to the loop (nodes may join, leave
    or fill meanwhile): after an await, ``refresh``."""

    __slots__ = ("_nodes", "_prefer", "_order", "_largest")

    def __init__(self, nodes: Mapping[str, Node], prefer: str | None) -> None:
        self._nodes, self._prefer = nodes, prefer
        self.refresh()

    def refresh(self) -> None:
        # (sort key, position in node order: a stable sort's tie-break, node, space)
        self._order = sorted((_order(n, s, self._prefer), i, n, s)
                             for i, (n, s) in enumerate(_arenas(self._nodes.values())))
        self._largest: dict[str, int] = {}

    @property
    def best(self) -> tuple[Node, TierSpace] | None:
        return (self._order[0][2], self._order[0][3]) if self._order else None

    def largest(self, region: str) -> int:
        """The largest slice of ``region`` in any arena: no bigger block can ever fit."""
        size = self._largest.get(region)
        if size is None:
            size = self._largest[region] = max(
                (s.allocator.region(region).size for _, _, _, s in self._order  # type: ignore[union-attr]
                 ), default=0)
        return size

    def allocate(self, size: int, region: str) -> tuple[Node, TierSpace, int] | None:
        """``size`` bytes in ``region`` of the best arena with room, or None."""
        order = self._order
        for i, (_, pos, node, space) in enumerate(order):
            offset = space.allocator.allocate(size, region)  # type: ignore[union-attr]
            if offset is None:
                continue
            moved = (_order(node, space, self._prefer), pos, node, space)
            while i + 1 < len(order) and order[i + 1] < moved:
                order[i] = order[i + 1]
                i += 1
            order[i] = moved
            return node, space, offset
        return None


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
