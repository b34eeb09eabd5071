"""A server freezes what survives a full collection: later collections walk only newer
objects, a frozen record still goes when its block does, and new cycles are collected."""

from __future__ import annotations

import gc
import tracemalloc
import weakref
from typing import Iterator

import pytest

from kvpool import heap
from kvpool.config import MasterConfig
from kvpool.tiers.base import TierKind
from master.index import BlockEntry, BlockState, Replica
from master.state import PoolState


class Record:
    """Stands for an index entry: small, tracked, no cycles."""

    __slots__ = ("key", "replicas", "__weakref__")

    def __init__(self, key: int) -> None:
        self.key, self.replicas = key, [key]


@pytest.fixture
def freezing() -> Iterator[None]:
    heap.freeze_survivors()
    try:
        yield
    finally:
        heap.stop_freezing()


def test_records_that_survived_a_full_collection_are_not_walked_again(freezing: None) -> None:
    records = [Record(i) for i in range(50_000)]
    before = heap.STATS.count
    gc.collect()
    assert heap.STATS.count == before + 1 and heap.STATS.last_s > 0
    assert heap.STATS.frozen >= len(records)
    walked = {id(o) for o in gc.get_objects()}
    assert not any(id(r) in walked for r in records[::997])
    gone = weakref.ref(records[-1])
    del records[-1]  # reference counting frees a frozen record at once
    assert gone() is None


def test_cycles_made_after_the_freeze_are_still_collected(freezing: None) -> None:
    gc.collect()
    a, b = Record(1), Record(2)
    a.replicas, b.replicas = [b], [a]
    gone = weakref.ref(a)
    del a, b
    assert gone() is not None
    gc.collect()
    assert gone() is None


def test_stopping_unfreezes_everything() -> None:
    heap.freeze_survivors()
    gc.collect()
    assert heap.STATS.frozen > 0
    heap.stop_freezing()
    assert heap.STATS.frozen == 0 and heap._after_full not in gc.callbacks


def test_a_master_s_index_goes_at_once_when_its_term_ends(freezing: None) -> None:
    """Frozen, the index of an ended term would never be collected if anything in it were
    a cycle: it goes by reference counting, as soon as the state lets it go."""
    tracemalloc.start()  # it counts what was allocated while it traced
    try:
        empty = tracemalloc.get_traced_memory()[0]
        state = PoolState(MasterConfig())
        for i in range(5_000):
            key = i.to_bytes(16, "little")
            state.index.add(BlockEntry(key, 4096, BlockState.COMPLETE,
                                       [Replica("n1", TierKind.HOST, i * 4096, 4096)], b"h",
                                       parent=(i - 1).to_bytes(16, "little") if i else None))
        gc.collect()  # the index survives a full collection: it is frozen
        assert heap.STATS.frozen > 5_000
        held = tracemalloc.get_traced_memory()[0] - empty
        state.clear()
        left = tracemalloc.get_traced_memory()[0] - empty
    finally:
        tracemalloc.stop()
    assert held > 5_000 * 500 and left < held / 20, f"{left} of {held} bytes still held"
