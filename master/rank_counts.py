"""Counts per tier rank (a block's cached children in each tier), packed in one int.

The index and the eviction policies keep such a row for every block that has children,
which is nearly every block of a chain. A list of four ints cost 88 bytes a block and a
tuple 72; packed, 32 bits per rank, a row is one int, and since most rows are equal (one
child, in the host tier) the first few thousand distinct values are shared.
"""

from __future__ import annotations

BITS = 32
RANKS = 4  # gpu, host, ssd, object (kvpool.tiers.base.TIER_ORDER)
NONE = 0
_FIELD = (1 << BITS) - 1
_UPTO = [(1 << (BITS * (r + 1))) - 1 for r in range(RANKS)]  # the fields of ranks 0..r
_SHARED: dict[int, int] = {}
_MAX_SHARED = 4096


def bumped(counts: int, rank: int, delta: int) -> int:
    """``counts`` with ``delta`` added at ``rank`` (never below zero: callers add before
    they take away)."""
    row = counts + (delta << (BITS * rank))
    shared = _SHARED.get(row)
    if shared is not None:
        return shared
    if len(_SHARED) < _MAX_SHARED:
        _SHARED[row] = row
    return row


def any_upto(counts: int, rank: int) -> bool:
    """Is any count at ``rank`` or a faster (lower) one above zero?"""
    return bool(counts & _UPTO[rank])


def sum_upto(counts: int, rank: int) -> int:
    """The counts at ``rank`` and every faster one, added."""
    return sum((counts >> (BITS * r)) & _FIELD for r in range(rank + 1))


def unpacked(counts: int) -> list[int]:
    return [(counts >> (BITS * r)) & _FIELD for r in range(RANKS)]
