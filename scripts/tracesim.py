"""Trace simulator for the eviction policies of master/policy.py.

Replays a Mooncake-format trace (one JSON request per line: ``timestamp`` in ms,
``hash_ids`` of prefix-chained 512-token blocks) the way a prefill engine drives the pool:
match the longest cached prefix (a block in any tier counts), read those blocks (a hit in
SSD promotes the block into host, its SSD copy stays, as ``master/tiering.py`` does),
write the misses into host. A full tier evicts what its policy names first, skipping a
block that has a cached child in this or a faster tier (prefix-aware, as the master does)
and the blocks the current request is reading; a block leaving host is demoted into SSD
when the SSD policy admits it and SSD holds no copy yet; a block leaving SSD is gone.

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

from master.policy import DEFAULT_POLICY, POLICIES, BlockInfo, EvictionPolicy, PolicyFactory

DEFAULT_TRACE = Path("/work/shared/traces/conversation_trace.jsonl")
BLOCK = 1  # every block has the same size: capacities are block counts
HOST_FRACS = (0.02, 0.05, 0.10, 0.20, 0.50)
TWO_TIER = ((0.05, 0.15),)


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


class _Tier:
    """One simulated tier: the keys it holds, its capacity, its policy."""

    __slots__ = ("name", "cap", "held", "policy")

    def __init__(self, name: str, cap: int, policy: EvictionPolicy) -> None:
        self.name, self.cap, self.policy = name, cap, policy
        self.held: set[bytes] = set()


class _Sim:
    """Host (and optionally SSD) driven by one policy factory; see the module docstring."""

    def __init__(self, factory: PolicyFactory, host_cap: int, ssd_cap: int) -> None:
        self.host = _Tier("host", host_cap, factory.make("host", host_cap * BLOCK))
        self.ssd = _Tier("ssd", ssd_cap, factory.make("ssd", ssd_cap * BLOCK)) if ssd_cap else None
        self.info: dict[bytes, BlockInfo] = {}
        self.hchild: dict[bytes, int] = {}  # cached children in host
        self.achild: dict[bytes, int] = {}  # cached children in host or SSD
        self.busy: set[bytes] = set()  # the blocks the current request reads (leased)
        self.skipped = 0

    def _cached(self, key: bytes) -> bool:
        return key in self.host.held or (self.ssd is not None and key in self.ssd.held)

    def _enter(self, tier: _Tier, key: bytes, now: float) -> None:
        info = self.info[key]
        p = info.parent
        if p is not None:
            if not self._cached(key):
                self.achild[p] = self.achild.get(p, 0) + 1
            if tier is self.host:
                self.hchild[p] = self.hchild.get(p, 0) + 1
        tier.held.add(key)
        tier.policy.inserted(info, now)

    def _leave(self, tier: _Tier, key: bytes) -> None:
        tier.held.discard(key)
        tier.policy.removed(key)
        p = self.info[key].parent
        if p is not None:
            if tier is self.host:
                self.hchild[p] -= 1
            if not self._cached(key):
                self.achild[p] -= 1

    def _victim(self, tier: _Tier) -> bytes | None:
        counts = self.hchild if tier is self.host else self.achild
        for key in tier.policy.victims():
            if counts.get(key, 0) == 0 and key not in self.busy:
                return key
            self.skipped += 1
        return None

    def _make_room(self, tier: _Tier, now: float) -> bool:
        """Free one slot in ``tier``; False when nothing can move."""
        while len(tier.held) >= tier.cap:
            v = self._victim(tier)
            if v is None:
                return False
            if tier is self.host and self.ssd is not None and v not in self.ssd.held \
                    and self.ssd.policy.admit(self.info[v], now):
                if self._make_room(self.ssd, now):
                    self._enter(self.ssd, v, now)
            self._leave(tier, v)
        return True

    def request(self, r: Request, res: SimResult) -> None:
        keys, now = r.keys, r.now
        m = 0
        while m < len(keys) and self._cached(keys[m]):
            m += 1
        res.requested += len(keys)
        res.hits += m
        self.busy = set(keys[:m])
        for key in keys[:m]:
            if key in self.host.held:
                res.per_tier["host"] += 1
                self.host.policy.accessed(key, now)
            else:
                assert self.ssd is not None
                res.per_tier["ssd"] += 1
                self.ssd.policy.accessed(key, now)
                if self._make_room(self.host, now):  # promotion: copy up, SSD keeps its copy
                    self._enter(self.host, key, now)
        parent = keys[m - 1] if m else None
        for key in keys[m:]:
            if key not in self.info:
                self.info[key] = BlockInfo(key, BLOCK, parent)
            parent = key
            if self._make_room(self.host, now):
                self._enter(self.host, key, now)
            self.busy.add(key)
        self.busy = set()


def simulate(reqs: list[Request], factory: PolicyFactory, host_frac: float,
             ssd_frac: float = 0.0, distinct: int | None = None) -> SimResult:
    """Hit rate of ``factory``'s policies with host (and SSD) capacities given as fractions
    of the trace's distinct blocks."""
    n = distinct if distinct is not None else distinct_blocks(reqs)
    sim = _Sim(factory, max(1, round(host_frac * n)), round(ssd_frac * n))
    res = SimResult(factory.name, host_frac, ssd_frac, 0, 0, {"host": 0, "ssd": 0} if ssd_frac else {"host": 0})
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
