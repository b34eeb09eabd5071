"""Replay a Mooncake-format trace against a live pool and measure its prefix hit rate.

Each request (one JSON line: ``timestamp`` in ms, ``hash_ids`` of prefix-chained
512-token blocks) does what a prefill engine does: match the prefix, get the hits, put
the misses chained to the matched prefix. The pool is a real `kvpool up` process whose
host arena (and SSD tier) hold a given fraction of the trace's distinct blocks. Requests
go in arrival order with time compressed by ``--speed`` (the pool's time-based settings
see the compressed clock, which the report states). Beside the live figures stand
simulated bounds at the same capacities: plain LRU and Belady's offline optimum
(scripts/tracesim.py), and the ideal hit rate of unlimited capacity.

    python scripts/replay_trace.py            # every capacity the tiering targets name
    python scripts/replay_trace.py --quick    # the first 3,000 requests
    python scripts/replay_trace.py --policy lru --host-frac 0.1 --json out.json --plot hit.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import tracesim  # noqa: E402
from benchlib import machine  # noqa: E402
from clients.client import AsyncPoolClient  # noqa: E402
from kvpool.launcher import spawn, stop  # noqa: E402
from master.policy import DEFAULT_POLICY, POLICIES  # noqa: E402

TRACE = ROOT.parent / "shared" / "traces" / "conversation_trace.jsonl"
# The targets' capacities, the ones the targets name first (a run cut short keeps them).
TARGETS = [(0.05, 0.0), (0.10, 0.0), (0.05, 0.15), (0.02, 0.0), (0.20, 0.0), (0.50, 0.0)]
TIERS = ("gpu", "host", "ssd", "object")
# The tiers kept full: what a tier holds between sweeps is what it can serve.
WATERMARK_PAIR = tracesim.WATERMARKS
WATERMARKS = {f"KVPOOL_MASTER_{tier}_{side}": str(level) for tier in ("HOST", "SSD")
              for side, level in zip(("HIGH", "LOW"), WATERMARK_PAIR)}


@dataclass(slots=True)
class Run:
    policy: str
    host_frac: float
    ssd_frac: float
    hit_rate: float = 0.0
    of_ideal: float = 0.0
    sim_of_ideal: float = 0.0  # this policy in scripts/tracesim.py, which drives the master's index
    lru_sim_of_ideal: float = 0.0
    belady_of_ideal: float = 0.0
    per_tier: dict[str, float] = field(default_factory=dict)  # blocks served by tier / requested
    seconds: float = 0.0
    compression: float = 0.0  # trace seconds per replay second


def counters(master: str) -> dict[str, int]:
    with urllib.request.urlopen(master + "/metrics", timeout=10) as resp:
        out = {}
        for line in resp.read().decode().splitlines():
            if line.startswith('kvpool_ops_total{op="'):
                name = line.split('"')[1]
                out[name] = int(float(line.split()[-1]))
        return out


async def replay(master: str, requests: list[tracesim.Request], block_bytes: int, speed: float,
                 label: str) -> tuple[int, int, float]:
    """Replay every request; returns (blocks served, blocks requested, seconds)."""
    payload = np.random.default_rng(0).integers(0, 256, block_bytes, dtype=np.uint8)
    most = max(len(r.keys) for r in requests)
    outs = [np.empty(block_bytes, np.uint8) for _ in range(most)]
    served = asked = 0
    t0 = time.monotonic()
    start = requests[0].now
    step = max(1, len(requests) // 20)
    async with AsyncPoolClient(master_url=master) as pool:
        for buf in [payload, *outs]:
            pool.register(buf)
        for i, req in enumerate(requests):
            if speed > 0:
                due = t0 + (req.now - start) / speed
                if due > time.monotonic():
                    await asyncio.sleep(due - time.monotonic())
            keys = list(req.keys)
            asked += len(keys)
            n = await pool.match_prefix(keys)
            hits = 0
            if n:
                for res in await pool.batch_get(keys[:n], outs[:n]):
                    if not res.hit:
                        break
                    hits += 1
            served += hits
            if hits < len(keys):
                await pool.batch_put(keys[hits:], [payload] * (len(keys) - hits), chained=True,
                                     parent=keys[hits - 1] if hits else None)
            if (i + 1) % step == 0 or i + 1 == len(requests):
                print(f"\r  {label}: {i + 1}/{len(requests)} requests, hit rate "
                      f"{served / asked:.3f}", end="", flush=True)
    print(flush=True)
    return served, asked, time.monotonic() - t0


START_S = 300.0  # a pool's start on a loaded machine (a quiet one takes a few seconds)


def start_pool(workdir: Path, policy: str, host_bytes: int, ssd_bytes: int) -> tuple[object, str]:
    """A `kvpool up` process with these capacities; waits up to START_S for it, saying so."""
    env = {"KVPOOL_MASTER_POLICY": policy, "KVPOOL_DAEMON_HOST_BYTES": str(host_bytes),
           "KVPOOL_DAEMON_SSD_BYTES": str(ssd_bytes), "KVPOOL_DAEMON_OBJECT_BYTES": "0",
           "KVPOOL_MASTER_SWEEP_INTERVAL_S": "0.1", "KVPOOL_DAEMON_COLD_CODEC": "raw",
           **WATERMARKS}
    print(f"  starting a pool ({policy}, host {host_bytes >> 20} MiB, ssd {ssd_bytes >> 20} MiB; "
          f"waiting up to {START_S:.0f} s)", flush=True)
    t0 = time.monotonic()
    popen, info = spawn("kvpool", ["up", "--port", "0", "--data-dir", str(workdir)], env,
                        workdir.with_suffix(".log"), start_s=START_S)
    print(f"  pool up in {time.monotonic() - t0:.1f} s", flush=True)
    return popen, info["master"]


async def measure(run: Run, requests: list[tracesim.Request], distinct: int, ideal: float,
                  block_bytes: int, speed: float, tmp: Path) -> Run:
    host = max(1, int(run.host_frac * distinct)) * block_bytes
    ssd = int(run.ssd_frac * distinct) * block_bytes
    label = f"{run.policy} host {run.host_frac:.0%}" + (f" ssd {run.ssd_frac:.0%}" if ssd else "")
    workdir = tmp / label.replace(" ", "_").replace("%", "")
    popen, master = start_pool(workdir, run.policy, host, ssd)
    try:
        before = counters(master)
        served, asked, seconds = await replay(master, requests, block_bytes, speed, label)
        after = counters(master)
    finally:
        stop(popen)
    run.hit_rate = served / asked
    run.of_ideal = run.hit_rate / ideal if ideal else 0.0
    run.per_tier = {t: (after.get(f"get_hits_{t}", 0) - before.get(f"get_hits_{t}", 0)) / asked
                    for t in TIERS if after.get(f"get_hits_{t}", 0) > before.get(f"get_hits_{t}", 0)}
    run.seconds = round(seconds, 1)
    span_s = requests[-1].now - requests[0].now
    run.compression = round(span_s / seconds, 1) if seconds else 0.0
    return run


def simulated(trace: str, limit: int | None, name: str, host_frac: float, ssd_frac: float) -> float:
    """One simulated figure (of ideal) at one capacity: a policy, or "belady". Runs in a
    worker process, beside the live replays."""
    requests = tracesim.load_trace(trace, limit)
    distinct, ideal = tracesim.distinct_blocks(requests), tracesim.ideal_hit_rate(requests)
    if name == "belady":
        res = tracesim.belady(requests, host_frac, ssd_frac, distinct)
    else:
        res = tracesim.simulate(requests, POLICIES[name](), host_frac, ssd_frac, distinct,
                                WATERMARK_PAIR)
    return res.hit_rate / ideal if ideal else 0.0


def table(runs: list[Run], ideal: float) -> str:
    head = (f"{'policy':<12} {'host':>5} {'ssd':>5} {'hit rate':>8} {'of ideal':>8} {'sim':>6} "
            f"{'LRU sim':>7} {'Belady':>7} {'host hits':>9} {'ssd hits':>8} {'seconds':>7}")
    lines = [f"ideal hit rate (unlimited capacity): {ideal:.4f}", head, "-" * len(head)]
    for r in runs:
        lines.append(f"{r.policy:<12} {r.host_frac:>5.0%} {r.ssd_frac:>5.0%} {r.hit_rate:>8.4f} "
                     f"{r.of_ideal:>8.3f} {r.sim_of_ideal:>6.3f} {r.lru_sim_of_ideal:>7.3f} "
                     f"{r.belady_of_ideal:>7.3f} "
                     f"{r.per_tier.get('host', 0):>9.4f} {r.per_tier.get('ssd', 0):>8.4f} "
                     f"{r.seconds:>7.1f}")
    return "\n".join(lines)


def plot(runs: list[Run], path: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: .venv/bin/pip install -e '.[bench]'") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    host_only = [r for r in runs if r.ssd_frac == 0]
    for policy in sorted({r.policy for r in host_only}):
        pts = sorted((r.host_frac, r.of_ideal) for r in host_only if r.policy == policy)
        ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], marker="o", label=f"{policy} (live)")
    first = sorted({(r.host_frac, r.lru_sim_of_ideal, r.belady_of_ideal) for r in host_only})
    if first:
        ax.plot([p[0] * 100 for p in first], [p[1] for p in first], ls="--", label="LRU (simulated)")
        ax.plot([p[0] * 100 for p in first], [p[2] for p in first], ls=":", label="Belady (offline)")
    ax.set_xscale("log")
    ax.set_xlabel("host arena, % of the trace's distinct blocks")
    ax.set_ylabel("prefix hit rate / ideal")
    ax.set_ylim(0, 1.05)
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title("kvpool trace replay: hit rate against capacity")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trace", default=str(TRACE))
    ap.add_argument("--quick", action="store_true", help="the first 3,000 requests")
    ap.add_argument("--requests", type=int, default=0, help="replay only the first N requests")
    ap.add_argument("--policy", choices=sorted(POLICIES), help="one policy (default: the default and lru)")
    ap.add_argument("--host-frac", type=float, help="host capacity / distinct blocks (one configuration)")
    ap.add_argument("--ssd-frac", type=float, default=None, help="SSD capacity / distinct blocks")
    ap.add_argument("--block-kib", type=int, default=64, help="payload of each block (KiB)")
    ap.add_argument("--speed", type=float, default=120.0,
                    help="time compression: trace seconds per replay second (0: as fast as it goes)")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--plot", help="draw hit rate against capacity into this PNG")
    ap.add_argument("--resume", action="store_true",
                    help="keep the live runs already in --json (same trace and requests) and run "
                         "only the others: a replay cut short goes on where it stopped")
    ap.add_argument("--replot", metavar="JSON",
                    help="only draw --plot from the runs of a JSON written earlier (one cut short too)")
    args = ap.parse_args()
    if args.replot:
        saved = json.loads(Path(args.replot).read_text())
        runs = [Run(**r) for r in saved["runs"]]
        print(table(runs, saved["ideal"]))
        if args.plot:
            plot(runs, args.plot)
        return 0

    requests = tracesim.load_trace(args.trace, 3000 if args.quick else args.requests or None)
    distinct, ideal = tracesim.distinct_blocks(requests), tracesim.ideal_hit_rate(requests)
    policies = [args.policy] if args.policy else [DEFAULT_POLICY] + (["lru"] if DEFAULT_POLICY != "lru" else [])
    if args.host_frac is not None:
        configs = [(args.host_frac, args.ssd_frac or 0.0)]
    else:
        configs = TARGETS
    print(f"{len(requests)} requests, {distinct} distinct blocks of {args.block_kib} KiB, "
          f"ideal hit rate {ideal:.4f}; time compressed {args.speed:g}x", flush=True)
    runs: list[Run] = []
    if args.resume:
        if not args.json or not Path(args.json).exists():
            raise SystemExit("--resume needs --json PATH written by an earlier replay")
        saved = json.loads(Path(args.json).read_text())
        if (saved["requests"], saved["distinct_blocks"]) != (len(requests), distinct):
            raise SystemExit(f"{args.json} replayed another trace or request count")
        runs = [Run(**r) for r in saved["runs"]]
        print(f"resuming: {len(runs)} runs kept from {args.json}", flush=True)
    done = {(r.policy, r.host_frac, r.ssd_frac) for r in runs}
    limit = 3000 if args.quick else args.requests or None
    with ProcessPoolExecutor(max_workers=1) as pool, \
            tempfile.TemporaryDirectory(prefix="kvpool-replay-") as tmp:
        sims = {(name, h, s): pool.submit(simulated, args.trace, limit, name, h, s)
                for h, s in dict.fromkeys([*configs, *((r.host_frac, r.ssd_frac) for r in runs)])
                for name in dict.fromkeys([*policies, *(r.policy for r in runs), "lru", "belady"])}
        def fill(wait: bool) -> None:
            for run in runs:
                at = (run.host_frac, run.ssd_frac)
                for attr, name in (("sim_of_ideal", run.policy), ("lru_sim_of_ideal", "lru"),
                                   ("belady_of_ideal", "belady")):
                    if wait or sims[(name, *at)].done():
                        setattr(run, attr, sims[(name, *at)].result())

        def report(complete: bool) -> dict:
            out = {"ideal": ideal, "default_policy": DEFAULT_POLICY, "requests": len(requests),
                   "distinct_blocks": distinct, "block_bytes": args.block_kib << 10,
                   "time_compression": args.speed, "watermarks": list(WATERMARK_PAIR),
                   "complete": complete, "runs": [asdict(r) for r in runs],
                   "machine": machine("kvpool up (master + daemon) and one replaying client "
                                      "process on this machine; NIXL UCX over loopback")}
            if args.json:  # after every run, so a replay cut short keeps what it measured
                Path(args.json).write_text(json.dumps(out, indent=2))
            return out

        for host_frac, ssd_frac in configs:
            for policy in policies:
                if (policy, host_frac, ssd_frac) in done:
                    continue
                run = Run(policy, host_frac, ssd_frac)
                runs.append(await measure(run, requests, distinct, ideal, args.block_kib << 10,
                                          args.speed, Path(tmp)))
                fill(wait=False)
                report(complete=False)
        print("waiting for the simulations", flush=True)
        fill(wait=True)
        report(complete=True)
    print(table(runs, ideal))
    if args.plot:
        plot(runs, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
