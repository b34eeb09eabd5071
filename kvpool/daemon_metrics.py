"""A pool daemon's Prometheus metrics (``/metrics`` on the daemon), through ``prometheus_client``.

Tier moves are the bytes a daemon itself moves (engines' bytes go through NIXL without
its Python code): their latency, bytes and errors are counted where the copy happens;
what each tier holds is read from the tiers when Prometheus scrapes."""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvpool.heap import HeapCollector
from kvpool.tiers.base import TierInfo, TierKind

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
COPY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                0.5, 1.0, 2.5, 5.0)


class _Tiers(Collector):
    def __init__(self, node: str, infos: Callable[[], list[TierInfo]]) -> None:
        self.node, self.infos = node, infos

    def collect(self) -> Iterator[Metric]:
        labels = ["node", "tier"]
        cap = GaugeMetricFamily("kvpool_daemon_tier_capacity_bytes", "Capacity of this node's tier",
                                labels=labels)
        used = GaugeMetricFamily("kvpool_daemon_tier_used_bytes", "Bytes stored in this node's tier",
                                 labels=labels)
        blocks = GaugeMetricFamily("kvpool_daemon_tier_blocks", "Blocks in this node's tier",
                                   labels=labels)
        for info in self.infos():
            where = [self.node, info.kind.value]
            cap.add_metric(where, info.capacity)
            used.add_metric(where, info.used)
            blocks.add_metric(where, info.blocks)
        yield from (cap, used, blocks)


class DaemonMetrics:
    def __init__(self, node: str, infos: Callable[[], list[TierInfo]]) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Tiers(node, infos))
        self.registry.register(HeapCollector())
        r = self.registry
        self.copy_seconds = Histogram("kvpool_daemon_copy_seconds", "Time to move one block "
                                      "between this node's tiers (read, verify, write)",
                                      ["src", "dst"], registry=r, buckets=COPY_BUCKETS)
        self.copy_bytes = Counter("kvpool_daemon_copy_bytes", "Payload bytes moved between tiers",
                                  ["src", "dst"], registry=r)
        self.copy_errors = Counter("kvpool_daemon_copy_errors", "Tier moves that failed, by error",
                                   ["src", "dst", "error"], registry=r)
        self.checksum_failures = Counter("kvpool_daemon_checksum_failures", "Blocks that failed "
                                         "their checksum leaving a cold tier (dropped)", ["tier"],
                                         registry=r)
        self.adopted = Counter("kvpool_daemon_adopted_blocks", "Blocks engines wrote into the "
                               "arenas that this node recorded at commit", registry=r)
        self.sent_bytes = Counter("kvpool_daemon_sent_bytes", "Payload bytes this node wrote "
                                  "into other nodes' arenas (a drain moving its blocks off)",
                                  registry=r)
        self.dropped = Counter("kvpool_daemon_dropped_blocks", "Blocks the master told this node "
                               "to forget", registry=r)

    def prepare(self, kinds: list[TierKind]) -> None:
        """Create the series of every move between this node's tiers at zero, so a
        dashboard's rate() of them reads 0 before the first move, not no data."""
        ranked = sorted(kinds, key=lambda k: k.rank)
        for src, dst in zip(ranked, ranked[1:]):
            for a, b in ((src, dst), (dst, src)):
                self.copy_seconds.labels(a.value, b.value)
                self.copy_bytes.labels(a.value, b.value)
                for code in ("checksum_mismatch", "not_found", "no_space"):
                    self.copy_errors.labels(a.value, b.value, code)
        for kind in ranked:
            if not kind.is_arena:
                self.checksum_failures.labels(kind.value)

    def render(self) -> bytes:
        return generate_latest(self.registry)
