"""Trace simulator for the eviction policies of master/policy.py.

Replays a Mooncake-format trace (one JSON request per line: ``timestamp`` in ms,
``hash_ids`` of prefix-chained 512-token blocks) the way a prefill engine drives the pool,
and the way the master answers: it drives the master's own ``Index`` and policy objects
with the calls a live pool makes. Per request: match the longest cached prefix (a block in
any tier counts); get those blocks under a lease (a hit in SSD is promoted into host, its
SSD copy stays); then, the lease released, reserve the misses (a key already stored
answers EXISTS and is left as it is), each PENDING until the commit. A full host arena
relieves itself to its low watermark, as ``Tiering.relieve`` does, in the index's
eviction order (prefix-aware, one chain block at a time); a block leaving host is
demoted into SSD when the SSD policy admits it and SSD holds no copy yet; a block
leaving SSD is gone. After each request every tier above its high watermark is relieved
(the master's sweep).

Capacity is a fraction of the trace's distinct blocks, in blocks (all blocks the same
size). Hit rate = blocks served from the pool / blocks requested; "ideal" is the hit rate
with unlimited capacity. Belady's offline optimum evicts the block whose next occurrence
(in any later request) is farthest; with prefix-chained keys a block never occurs later
than its parent's next occurrence, so it evicts leaves first by itself. With two tiers it
runs at the total capacity (host + SSD): tiers change where a hit is served, not whether.

    python scripts/tracesim.py [--quick] [--json PATH] [--trace PATH]
"""

from __future__ import annotations

import argparse
import heapq
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from kvpool.tiers.base import TierKind
from master.index import BlockEntry, BlockState, Index, Replica
from master.policy import DEFAULT_POLICY, POLICIES, PolicyFactory

DEFAULT_TRACE = Path("/work/shared/traces/conversation_trace.jsonl")
BLOCK = 1  # every block has the same size: capacities are block counts
HOST_FRACS = (0.02, 0.05, 0.10, 0.20, 0.50)
TWO_TIER = ((0.05, 0.15),)
WATERMARKS = (0.995, 0.99)  # (high, low) of every tier, as scripts/replay_trace.py sets them
NODE = "sim"


@dataclass(frozen=True, slots=True)
class Request:
    now: float  # seconds (trace ms / 1000, divided by the time compression)
    keys: tuple[bytes, ...]  # prefix-chained block keys, first block first


def load_trace(path: Path | str = DEFAULT_TRACE, limit: int | None = None,
               compression: float = 1.0) -> list[Request]:
    """The first ``limit`` requests of a trace, hash ids turned into 16-byte keys."""
    out: list[Request] = []
    keys: dict[int, bytes] = {}
    with open(path) as f:
        for line in f:
            if limit is not None and len(out) >= limit:
                break
            r = json.loads(line)
            ks = tuple(keys.setdefault(h, h.to_bytes(16, "little")) for h in r["hash_ids"])
            out.append(Request(r["timestamp"] / 1000.0 / compression, ks))
    return out


def distinct_blocks(reqs: list[Request]) -> int:
    return len({k for r in reqs for k in r.keys})


def ideal_hit_rate(reqs: list[Request]) -> float:
    """Hit rate with unlimited capacity: every block seen before, in its prefix, hits."""
    seen: set[bytes] = set()
    hits = total = 0
    for r in reqs:
        total += len(r.keys)
        m = 0
        while m < len(r.keys) and r.keys[m] in seen:
            m += 1
        hits += m
        seen.update(r.keys)
    return hits / total if total else 0.0


@dataclass(slots=True)
class SimResult:
    policy: str
    host_frac: float
    ssd_frac: float
    hits: int
    requested: int
    per_tier: dict[str, int] = field(default_factory=dict)  # hits served by each tier
    seconds: float = 0.0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requested if self.requested else 0.0


class _Pool:
    """The master's index and tiering, synchronously: one node, a host arena (and SSD),
    capacities in blocks. It drives ``master.index.Index`` (and through it the policy)
    with the calls the master makes for each step of a request, so a simulated policy is
    the policy the live pool runs."""

    def __init__(self, factory: PolicyFactory, host_cap: int, ssd_cap: int,
                 watermarks: tuple[float, float] = WATERMARKS) -> None:
        self.index = Index(lambda owner, kind: factory.make(kind.value, self.cap[kind] * BLOCK))
        self.cap = {TierKind.HOST: host_cap, TierKind.SSD: ssd_cap}
        self.used = {TierKind.HOST: 0, TierKind.SSD: 0}
        self.high, self.low = watermarks
        self.now = 0.0

    def _relieve(self, kind: TierKind, need: int = 0, at_least: int = 0) -> bool:
        """As ``Tiering.relieve``: down to the low watermark (and room for ``need``)."""
        cap = self.cap[kind]
        target = max(0, min(min(int(self.low * cap), cap - need), self.used[kind] - at_least))
        moved, leaves_only = False, True
        while self.used[kind] > target:
            victims, freed = [], 0
            for entry in self.index.coldest(NODE, kind, self.now, leaves_only):
                if self.used[kind] - freed <= target:
                    break
                if entry.movable(self.now):
                    victims.append(entry)
                    freed += 1
            if not victims:
                if not leaves_only:
                    break
                leaves_only = False
                continue
            self._demote(kind, victims)
            moved = True
        return moved

    def _demote(self, kind: TierKind, victims: list[BlockEntry]) -> None:
        below = TierKind.SSD if kind is TierKind.HOST and self.cap[TierKind.SSD] else None
        if below is not None:
            self._copy_down(below, victims)
        for entry in victims:  # as Tiering._drop_replicas
            replica = entry.replica(NODE, kind)
            if replica is None or entry.state is BlockState.REMOVED:
                continue
            self.index.drop_replica(entry, replica)
            self.used[kind] -= 1
            if not entry.replicas:
                self.index.remove(entry)

    def _copy_down(self, dst: TierKind, entries: list[BlockEntry]) -> None:
        admits = self.index.policy(NODE, dst)
        need = [e for e in entries if e.replica(NODE, dst) is None and admits.admit(e.info, self.now)]
        if need and self.used[dst] + len(need) > self.high * self.cap[dst]:
            self._relieve(dst, need=len(need))
        for e in need:
            if self.used[dst] < self.cap[dst] and e.state is not BlockState.REMOVED:
                self.index.add_replica(e, Replica(NODE, dst, 0, BLOCK))
                self.used[dst] += 1

    def _allocate(self) -> bool:
        """Room for one block in the host arena, as ``Puts._allocate``."""
        idle = 0
        while self.used[TierKind.HOST] >= self.cap[TierKind.HOST]:
            if idle >= 2:
                return False
            idle = 0 if self._relieve(TierKind.HOST, need=BLOCK, at_least=BLOCK) else idle + 1
        self.used[TierKind.HOST] += 1
        return True

    def request(self, r: Request, res: SimResult) -> None:
        """match_prefix, batch_get of the match (cold hits promoted), batch_put of the rest."""
        index, keys = self.index, r.keys
        self.now = r.now
        m = 0
        while m < len(keys) and index.readable(keys[m]) is not None:
            m += 1
        res.requested += len(keys)
        found = [index.readable(k) for k in keys[:m]]
        for e in found:
            e.leases[0] = float("inf")  # the get's lease, released with the next call
        hits = 0
        for e in found:
            best = e.best()
            res.per_tier[best.tier.value] += 1
            if best.tier is TierKind.SSD:  # promotion into the host arena
                e.advance(BlockState.MOVING, BlockState.COMPLETE)
                room = self._allocate()
                e.advance(BlockState.COMPLETE, BlockState.MOVING)
                if not room:
                    break
                index.add_replica(e, Replica(NODE, TierKind.HOST, 0, BLOCK))
            index.touch(e)
            hits += 1
        res.hits += hits
        for e in found:
            e.leases.clear()
        made = []
        parent = keys[hits - 1] if hits else None
        for key in keys[hits:]:
            if index.get(key) is None:  # else EXISTS: the master leaves it as it is
                if not self._allocate():
                    break
                entry = BlockEntry(key, BLOCK, BlockState.PENDING,
                                   [Replica(NODE, TierKind.HOST, 0, BLOCK)], parent=parent)
                index.add(entry)
                made.append(entry)
            parent = key
        for entry in made:  # commit
            entry.advance(BlockState.COMPLETE, BlockState.PENDING)
            entry.header = b"h"
            index.committed(entry, time.monotonic())
        for kind in (TierKind.HOST, TierKind.SSD):  # the sweep
            if self.cap[kind] and self.used[kind] > self.high * self.cap[kind]:
                self._relieve(kind)


def simulate(reqs: list[Request], factory: PolicyFactory, host_frac: float,
             ssd_frac: float = 0.0, distinct: int | None = None,
             watermarks: tuple[float, float] = WATERMARKS) -> SimResult:
    """Hit rate of ``factory``'s policies with host (and SSD) capacities given as fractions
    of the trace's distinct blocks."""
    n = distinct if distinct is not None else distinct_blocks(reqs)
    sim = _Pool(factory, max(1, round(host_frac * n)), round(ssd_frac * n), watermarks)
    res = SimResult(factory.name, host_frac, ssd_frac, 0, 0, {"host": 0, "ssd": 0})
    t0 = time.perf_counter()
    for r in reqs:
        sim.request(r, res)
    res.seconds = time.perf_counter() - t0
    return res


def belady(reqs: list[Request], host_frac: float, ssd_frac: float = 0.0,
           distinct: int | None = None) -> SimResult:
    """Belady's offline optimum at capacity (host + SSD) x distinct blocks: evict the cached
    block whose next occurrence is farthest (never again first; deeper blocks first on a
    tie). A miss is written and, when it is never used again, is the next victim."""
    n = distinct if distinct is not None else distinct_blocks(reqs)
    cap = max(1, round((host_frac + ssd_frac) * n))
    never = len(reqs)
    nxt: list[list[int]] = []  # per request, per block: index of the next request holding it
    last: dict[bytes, int] = {}
    for i in range(len(reqs) - 1, -1, -1):
        keys = reqs[i].keys
        nxt.append([last.get(k, never) for k in keys])
        for k in keys:
            last[k] = i
    nxt.reverse()
    res = SimResult("belady", host_frac, ssd_frac, 0, 0, {})
    t0 = time.perf_counter()
    cached: dict[bytes, int] = {}  # key -> its next use, as pushed on the heap
    heap: list[tuple[int, int, bytes]] = []
    for i, r in enumerate(reqs):
        keys = r.keys
        m = 0
        while m < len(keys) and keys[m] in cached:
            m += 1
        res.requested += len(keys)
        res.hits += m
        for j, k in enumerate(keys):
            use = nxt[i][j]
            if k not in cached:
                while len(cached) >= cap:
                    negu, _, v = heapq.heappop(heap)
                    if cached.get(v) == -negu:
                        del cached[v]
            cached[k] = use
            heapq.heappush(heap, (-use, -j, k))
    res.seconds = time.perf_counter() - t0
    return res


def table(reqs: list[Request], policies: list[str], configs: list[tuple[float, float]],
          log=print) -> dict:
    """Runs every policy and Belady at every (host_frac, ssd_frac); the issue's JSON shape."""
    n = distinct_blocks(reqs)
    ideal = ideal_hit_rate(reqs)
    runs = []
    log(f"{len(reqs)} requests, {n} distinct blocks, ideal hit rate {ideal:.4f}")
    log(f"{'policy':<12}{'host':>6}{'ssd':>6}{'hit':>8}{'of_ideal':>10}{'belady':>8}{'secs':>7}")
    for host_frac, ssd_frac in configs:
        b = belady(reqs, host_frac, ssd_frac, n)
        for name in policies:
            res = simulate(reqs, POLICIES[name](), host_frac, ssd_frac, n)
            run = {"policy": name, "host_frac": host_frac, "ssd_frac": ssd_frac,
                   "hit_rate": res.hit_rate, "of_ideal": res.hit_rate / ideal,
                   "belady_of_ideal": b.hit_rate / ideal,
                   "per_tier": {t: h / res.requested for t, h in res.per_tier.items()}}
            runs.append(run)
            log(f"{name:<12}{host_frac:>6.2f}{ssd_frac:>6.2f}{res.hit_rate:>8.4f}"
                f"{run['of_ideal']:>10.3f}{run['belady_of_ideal']:>8.3f}{res.seconds:>7.1f}")
    return {"ideal": ideal, "default_policy": DEFAULT_POLICY, "distinct_blocks": n,
            "requests": len(reqs), "runs": runs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    ap.add_argument("--quick", action="store_true", help="the first 3,000 requests only")
    ap.add_argument("--json", type=Path, help="write the results as JSON here")
    ap.add_argument("--policy", action="append", help="policies to run (default: lru and the default)")
    args = ap.parse_args(argv)
    reqs = load_trace(args.trace, 3000 if args.quick else None)
    names = args.policy or list(dict.fromkeys(["lru", DEFAULT_POLICY]))
    configs = [(h, 0.0) for h in HOST_FRACS] + list(TWO_TIER)
    out = table(reqs, names, configs)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
