"""The cyclic garbage collector in a server that holds millions of long-lived records.

A master's index and a daemon's inventory are some ten small tracked objects per block,
living as long as their blocks. CPython's full collection walks every tracked object:
with 100 k blocks in a master it paused the process for a quarter of a second (at 10 M,
by extrapolation, for half a minute), and an index that grows pays it again at every
quarter of growth (a third of a master's put throughput at 100 k blocks, measured).

None of those records form reference cycles, so after each full collection the
survivors are frozen (``gc.freeze``): the next collections walk only what is newer, and
reference counting still frees a frozen record the moment its block goes. The cost is
that a cycle closed among objects frozen earlier is never collected: the long-lived
state a server lets go must not rely on the collector (the master cuts its policies'
cycle when a term ends) or must ``thaw`` when it goes.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Any, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


@dataclass(slots=True)
class FullCollections:
    """What full collections have cost this process (``/metrics`` shows it)."""

    count: int = 0
    last_s: float = 0.0
    longest_s: float = 0.0
    _started: float = 0.0

    @property
    def frozen(self) -> int:
        """Objects no collection walks any more."""
        return gc.get_freeze_count()


STATS = FullCollections()


def _after_full(phase: str, info: dict[str, Any]) -> None:
    if info.get("generation") != 2:
        return
    if phase == "start":
        STATS._started = time.perf_counter()
        return
    took = time.perf_counter() - STATS._started
    STATS.count += 1
    STATS.last_s = took
    STATS.longest_s = max(STATS.longest_s, took)
    gc.freeze()


def freeze_survivors() -> None:
    """From now on, what survives a full collection is frozen (see the module)."""
    if _after_full not in gc.callbacks:
        gc.callbacks.append(_after_full)


def thaw() -> None:
    """Long-lived state was let go (a master's term ended): unfreeze, so that whatever of
    it is left in cycles is found by the next full collection (which walks what lives
    then, and freezes it again)."""
    gc.unfreeze()


def stop_freezing() -> None:
    """Back to CPython's default: nothing frozen, every collection walks everything."""
    if _after_full in gc.callbacks:
        gc.callbacks.remove(_after_full)
    gc.unfreeze()


class HeapCollector(Collector):
    """The full collections' cost as Prometheus sees it, for any server's registry."""

    def collect(self) -> Iterator[Metric]:
        count = CounterMetricFamily("kvpool_gc_full_collections", "Full collections of the "
                                    "cyclic garbage collector in this process")
        count.add_metric([], STATS.count)
        last = GaugeMetricFamily("kvpool_gc_full_pause_seconds", "How long the latest full "
                                 "collection held the process", labels=["which"])
        last.add_metric(["last"], STATS.last_s)
        last.add_metric(["longest"], STATS.longest_s)
        frozen = GaugeMetricFamily("kvpool_gc_frozen_objects", "Objects that survived a full "
                                   "collection and are walked by none since (kvpool.heap)")
        frozen.add_metric([], STATS.frozen)
        yield from (count, last, frozen)
