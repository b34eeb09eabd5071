"""The master's Prometheus metrics (``/metrics``), through ``prometheus_client``.

The hot path only increments: the rooms count into ``PoolState.counters`` (a dict add)
and the RPC layer observes one histogram per call. Everything else (blocks and bytes per
tier and node, leases, pins, puts in flight, leadership) is computed when Prometheus
scrapes, by the collector below, so an idle master pays nothing for it.
configs/grafana-dashboard.json queries these names; tests/integration/test_ops.py checks
that each exists.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kvpool.heap import HeapCollector
from kvpool.tiers.base import TierKind

if TYPE_CHECKING:
    from master.core import MasterCore

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Seconds: an RPC takes from tens of microseconds (match) to seconds (a put that demotes).
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
           0.5, 1.0, 2.5, 5.0, 10.0)

# Counters the rooms keep under a plain name -> (family, help, label values).
_PLAIN: dict[str, tuple[str, str, dict[str, str]]] = {
    "reserved": ("kvpool_put_blocks", "Blocks by put phase", {"phase": "reserved"}),
    "committed": ("kvpool_put_blocks", "Blocks by put phase", {"phase": "committed"}),
    "reclaimed": ("kvpool_put_blocks", "Blocks by put phase", {"phase": "reclaimed"}),
    "get_hits": ("kvpool_get_blocks", "Blocks asked for by get, hit or missed", {"result": "hit"}),
    "get_misses": ("kvpool_get_blocks", "Blocks asked for by get, hit or missed", {"result": "miss"}),
    "match_hits": ("kvpool_match_blocks", "Blocks looked up by match_prefix: matched (hit) or "
                   "not (miss)", {"result": "hit"}),
    "match_misses": ("kvpool_match_blocks", "Blocks looked up by match_prefix: matched (hit) or "
                     "not (miss)", {"result": "miss"}),
    "promoted": ("kvpool_promotions", "Cold blocks copied into a host arena", {}),
    "evicted": ("kvpool_evictions", "Blocks evicted from the pool (their last replica went)", {}),
    "expired": ("kvpool_expired", "Blocks dropped from the last tier after its TTL", {}),
    "removed": ("kvpool_removed", "Blocks removed by clients or admins", {}),
    "purged": ("kvpool_purged", "Blocks removed by a purge", {}),
    "prefetched": ("kvpool_prefetched", "Cold blocks a prefetching match started promoting", {}),
}
# Counters kept per tier or reason as "<prefix>_<label value>".
_PER: dict[str, tuple[str, str, str]] = {
    "get_hits_": ("kvpool_get_hits_by_tier", "Get hits by the tier that served them", "tier"),
    "demoted_": ("kvpool_demotions", "Blocks demoted out of a tier (copied one tier down)", "tier"),
    "not_admitted_": ("kvpool_admissions_refused", "Demotions the slower tier's policy refused "
                      "(the block was evicted instead)", "tier"),
    "move_failed_": ("kvpool_moves_failed", "Tier moves that failed, by destination tier", "tier"),
    "dropped_": ("kvpool_replicas_dropped", "Replicas dropped because their bytes were bad or "
                 "gone, by error", "reason"),
}


class MasterCollector(Collector):
    """Everything computed at scrape time from the master's state."""

    def __init__(self, core: "MasterCore") -> None:
        self.core = core

    def collect(self) -> Iterator[Metric]:
        yield from self._counters()
        yield from self._gauges()

    def _counters(self) -> Iterator[Metric]:
        counters = dict(self.core.state.counters)
        tiers = sorted({k.value for n in self.core.state.nodes.values() for k in n.tiers})
        families: dict[str, CounterMetricFamily] = {}
        for name, (fam, doc, labels) in _PLAIN.items():  # every one, zeros included
            if fam not in families:
                families[fam] = CounterMetricFamily(fam, doc, labels=list(labels))
            families[fam].add_metric(list(labels.values()), counters.get(name, 0))
        for prefix, (fam, doc, label) in _PER.items():
            family = families[fam] = CounterMetricFamily(fam, doc, labels=[label])
            values = {name[len(prefix):]: v for name, v in counters.items() if name.startswith(prefix)}
            if label == "tier":  # known up front: a dashboard's rate() sees zeros, not nothing
                values = {**dict.fromkeys(tiers, 0), **values}
            for value, n in sorted(values.items()):
                family.add_metric([value], n)
        checksum = CounterMetricFamily("kvpool_checksum_failures", "Replicas whose bytes failed "
                                       "their checksum (dropped, never served)")
        checksum.add_metric([], counters.get("dropped_checksum_mismatch", 0))
        yield from families.values()
        yield checksum
        raw = CounterMetricFamily("kvpool_ops", "Every internal counter by its name", labels=["op"])
        for name, value in sorted(counters.items()):
            raw.add_metric([name], value)
        yield raw
        hits, misses = counters.get("match_hits", 0), counters.get("match_misses", 0)
        ratio = GaugeMetricFamily("kvpool_prefix_hit_ratio", "Blocks matched / blocks looked up "
                                  "by match_prefix since the master started")
        ratio.add_metric([], hits / (hits + misses) if hits + misses else 0.0)
        yield ratio

    def _gauges(self) -> Iterator[Metric]:
        core, st = self.core, self.core.state
        now = time.monotonic()
        # Kept by the index as blocks come and go: a scrape never walks the index.
        index = st.index
        pending = len(index) - index.readable_blocks
        g_blocks = GaugeMetricFamily("kvpool_tier_blocks", "Readable blocks per node (or shared "
                                     "store) and tier", labels=["node", "tier"])
        g_bytes = GaugeMetricFamily("kvpool_tier_block_bytes", "Payload bytes of the readable "
                                    "blocks per node and tier", labels=["node", "tier"])
        for (node, tier), (n, payload, _) in sorted(index.shown.items(),
                                                    key=lambda kv: (kv[0][0], kv[0][1].value)):
            g_blocks.add_metric([node, tier.value], n)
            g_bytes.add_metric([node, tier.value], payload)
        cap = GaugeMetricFamily("kvpool_tier_capacity_bytes", "Capacity per node and tier",
                                labels=["node", "tier"])
        used = GaugeMetricFamily("kvpool_tier_used_bytes", "Bytes in use (reserved or stored) "
                                 "per node and tier", labels=["node", "tier"])
        for node in st.nodes.values():
            for kind, space in sorted(node.tiers.items(), key=lambda kv: TierKind(kv[0]).rank):
                cap.add_metric([node.node_id, kind.value], space.capacity)
                used.add_metric([node.node_id, kind.value], space.used)
        yield from (g_blocks, g_bytes, cap, used)
        simple = [
            ("kvpool_nodes", "Pool daemons in the index", len(st.nodes)),
            ("kvpool_blocks", "Readable blocks in the pool", index.readable_blocks),
            ("kvpool_puts_in_flight", "Blocks reserved and not yet committed", pending),
            ("kvpool_leases_held", "Read leases held by readers", core.leases.held),
            ("kvpool_leases_kept", "Of them, leases of grants clients may keep for hot blocks",
             core.leases.kept),
            ("kvpool_leased_blocks", "Blocks under at least one read lease",
             core.leases.leased_blocks(now)),
            ("kvpool_pinned_blocks", "Blocks with a hard pin", index.pinned),
            ("kvpool_leader", "1 while this master leads and serves", int(core.role.value == "leader")),
            ("kvpool_leader_term", "The current term's tag (changes when leadership does)", st.term),
            ("kvpool_event_subscribers", "Readers of /v1/events", st.events.subscribers),
            ("kvpool_event_last_id", "Id of the latest KV event", st.events.last_id),
        ]
        for name, doc, value in simple:
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            yield g
        role = GaugeMetricFamily("kvpool_master_role", "This master's role (1 for the current one)",
                                 labels=["role"])
        for r in ("leader", "rebuilding", "standby"):
            role.add_metric([r], int(core.role.value == r))
        yield role


class MasterMetrics:
    """The master's registry: the collector plus the RPC latency histograms."""

    def __init__(self, core: "MasterCore") -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MasterCollector(core))
        self.registry.register(HeapCollector())
        self._calls = Histogram("kvpool_master_call_seconds", "Time the master takes to serve "
                                "one RPC call (put = reserve + commit, get, match, ...)",
                                ["call"], registry=self.registry, buckets=BUCKETS)
        self._children: dict[str, Histogram] = {}

    def call(self, name: str) -> Histogram:
        """The histogram child of one call (looked up once, then cached)."""
        child = self._children.get(name)
        if child is None:
            child = self._children[name] = self._calls.labels(name)
        return child

    def render(self) -> bytes:
        return generate_latest(self.registry)
