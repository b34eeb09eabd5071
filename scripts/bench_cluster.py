"""Cluster mode: aggregate get bandwidth over 1, 2 and 3 daemons, and a leader failover.

Everything runs as real processes on this machine (`kvpool.launcher.LocalCluster`): an
etcd server, masters, daemons, and two client processes.

1. Aggregate get GB/s: for 1, 2 and 3 daemons, one loader puts TOTAL bytes in 1 MiB
   blocks (placement spreads them over the daemons), then two client processes read all
   of them again and again in batches for a fixed time (each block's checksum verified,
   as the client always does; any miss fails the run). The figure is the bytes both
   read over the time window they shared.
2. Failover: two masters and two daemons; two client processes read (and verify) random
   batches in a loop while the leader is SIGKILLed. The gap is the longest stretch with
   no successful get in either client. Afterwards every block that was complete before
   the kill is read once more: lost blocks and wrong bytes must both be 0.

Prints a table; ``--json PATH`` writes the figures; ``--quick`` uses less data.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clients.client import AsyncPoolClient  # noqa: E402
from kvpool.launcher import LocalCluster  # noqa: E402
from kvpool.tasks import run as run_loop  # noqa: E402
from kvpool.config import ClientConfig  # noqa: E402
from kvpool.errors import KVPoolError  # noqa: E402
from kvpool.keys import Namespace, block_keys  # noqa: E402
from benchlib import machine  # noqa: E402

MiB = 1 << 20
BLOCK = 1 * MiB
BATCH = 16  # blocks per batch_get



def block_of(base: np.ndarray, i: int) -> np.ndarray:
    """Block i's bytes: a shared random base with its first 16 bytes unique to i."""
    data = base.copy()
    ids = np.array([i, i * 0x9E3779B97F4A7C15 % (1 << 64)], dtype=np.uint64)
    data[:16] = ids.view(np.uint8)
    return data


def base_bytes() -> np.ndarray:
    return np.random.default_rng(7).integers(0, 256, BLOCK, dtype=np.uint8)


def keys_for(n: int, salt: str) -> list[bytes]:
    return block_keys(Namespace("bench-cluster", "uint8", "raw", block_tokens=1, salt=salt), np.arange(n))


def client_cfg(etcd: str, cluster: str) -> ClientConfig:
    return ClientConfig(etcd=etcd, cluster=cluster, timeout_s=30.0)


async def load(etcd: str, cluster: str, n: int, salt: str) -> None:
    base = base_bytes()
    keys = keys_for(n, salt)
    async with AsyncPoolClient(client_cfg(etcd, cluster)) as pool:
        for start in range(0, n, BATCH):
            idx = range(start, min(n, start + BATCH))
            await pool.batch_put([keys[i] for i in idx], [block_of(base, i) for i in idx])


# -- the client processes ------------------------------------------------------------------

async def worker(args: argparse.Namespace) -> dict:
    """Read batches for ``seconds`` from the start the parent sends, verifying each block;
    report bytes read, the times of successful gets, failures by kind, and wrong bytes."""
    base = base_bytes()
    keys = keys_for(args.blocks, args.salt)
    rng = np.random.default_rng(args.seed)
    outs = np.empty((BATCH, BLOCK), np.uint8)
    got_bytes, ok_times, errors, wrong, misses = 0, [], {}, 0, 0
    async with AsyncPoolClient(client_cfg(args.etcd, args.cluster)) as pool:
        pool.register(outs)
        print("ready", flush=True)  # connected: the window starts once every client is
        start = float(await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline))
        while time.time() < start:
            await asyncio.sleep(0.001)
        first, until = time.time(), start + args.seconds
        pos = args.seed * BATCH
        while time.time() < until:
            if args.random:
                idx = rng.integers(0, args.blocks, BATCH).tolist()
            else:
                idx = [(pos + j) % args.blocks for j in range(BATCH)]
                pos += BATCH
            try:
                results = await pool.batch_get([keys[i] for i in idx], list(outs))
            except KVPoolError as exc:
                name = type(exc).__name__ + ("" if exc.retryable else " (NOT retryable)")
                errors[name] = errors.get(name, 0) + 1
                continue
            for j, (i, r) in enumerate(zip(idx, results)):
                if not r.hit:
                    misses += 1
                    continue
                if args.verify and not np.array_equal(outs[j], block_of(base, i)):
                    wrong += 1
                got_bytes += BLOCK
            ok_times.append(time.time())
        last = time.time()
    return {"bytes": got_bytes, "first": first, "last": last, "ok_times": ok_times,
            "errors": errors, "wrong": wrong, "misses": misses}


def spawn_workers(cl: LocalCluster, blocks: int, salt: str, seconds: float,
                  random: bool, verify: bool, n: int = 2) -> tuple[list[subprocess.Popen], float]:
    """Start the clients, wait until every one is connected, and start their window
    together (a fixed head start was not enough on a loaded machine: clients that were
    still importing began after the window had closed and read nothing). Returns them and
    the window's start."""
    procs = []
    for seed in range(n):
        cmd = [sys.executable, __file__, "worker", "--etcd", cl.etcd_endpoint, "--cluster",
               cl.cluster, "--blocks", str(blocks), "--salt", salt, "--seed", str(seed),
               "--seconds", str(seconds)]
        cmd += ["--random"] if random else []
        cmd += ["--verify"] if verify else []
        procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT))
    for p in procs:
        if p.stdout.readline().strip() != b"ready":  # type: ignore[union-attr]
            raise SystemExit(f"a client process failed to start (exit code {p.wait()})")
    start = time.time() + 0.2
    for p in procs:
        p.stdin.write(f"{start}\n".encode())  # type: ignore[union-attr]
        p.stdin.flush()  # type: ignore[union-attr]
    return procs, start


def collect(procs: list[subprocess.Popen]) -> list[dict]:
    out = []
    for p in procs:
        stdout, _ = p.communicate(timeout=300)
        if p.returncode != 0:
            raise SystemExit(f"a client process failed with {p.returncode}")
        out.append(json.loads(stdout.decode().strip().splitlines()[-1]))
    return out


# -- the two measurements ------------------------------------------------------------------

def aggregate_get(root: Path, daemons: int, total: int, seconds: float) -> float:
    n = total // BLOCK
    host = f"{(total // daemons + 64 * MiB) // MiB}MiB"
    cl = LocalCluster(root / f"agg{daemons}", ttl_s=3.0,
                      daemon_env={"KVPOOL_DAEMON_HOST_BYTES": host, "KVPOOL_DAEMON_SSD_BYTES": "64MiB",
                                  "KVPOOL_DAEMON_OBJECT_BYTES": "0"})
    try:
        cl.start_etcd()
        cl.start_master("master0")
        cl.wait_leader()
        for i in range(daemons):
            cl.start_daemon(f"node{i}")
        cl.wait_nodes(daemons)
        run_loop(load(cl.etcd_endpoint, cl.cluster, n, f"agg{daemons}"))
        procs, _ = spawn_workers(cl, n, f"agg{daemons}", seconds, random=False, verify=False)
        results = collect(procs)
    finally:
        cl.stop()
    wrong = sum(r["wrong"] for r in results)
    errors = merged_errors(results)
    if wrong or errors or any(r["misses"] for r in results):  # nothing fails here on purpose
        raise SystemExit(f"{daemons} daemon(s): {wrong} wrong blocks, misses "
                         f"{[r['misses'] for r in results]}, errors {errors or 'none'}")
    window = max(r["last"] for r in results) - min(r["first"] for r in results)
    got = sum(r["bytes"] for r in results)
    if got == 0 or window <= 0:
        raise SystemExit(f"{daemons} daemon(s): the clients read nothing in {window:.2f} s")
    return got / window / 1e9


def merged_errors(results: list[dict]) -> dict[str, int]:
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return errors


def failover(root: Path, total: int, ttl: float) -> dict:
    n = total // BLOCK
    cl = LocalCluster(root / "failover", ttl_s=ttl,
                      daemon_env={"KVPOOL_DAEMON_HOST_BYTES": f"{(total + 64 * MiB) // MiB}MiB",
                                  "KVPOOL_DAEMON_SSD_BYTES": "64MiB", "KVPOOL_DAEMON_OBJECT_BYTES": "0"})
    try:
        cl.start_etcd()
        for i in range(2):
            cl.start_master(f"master{i}")
        leader = cl.wait_leader()
        for i in range(2):
            cl.start_daemon(f"node{i}")
        cl.wait_nodes(2)
        run_loop(load(cl.etcd_endpoint, cl.cluster, n, "failover"))
        procs, start = spawn_workers(cl, n, "failover", 2.0 + ttl + 6.0, random=True, verify=True)
        kill_at = start + 2.0
        time.sleep(max(0.0, kill_at - time.time()))
        killed = time.time()
        cl.kill(leader.name, signal.SIGKILL)
        print(f"  killed the leader {leader.name} (pid {leader.popen.pid}); waiting for a standby",
              flush=True)
        new = cl.wait_leader(ttl + 20)
        took = time.time() - killed
        results = collect(procs)
        after = run_loop(final_read(cl.etcd_endpoint, cl.cluster, n))
    finally:
        cl.stop()
    times = sorted(t for r in results for t in r["ok_times"])
    gaps = [b - a for a, b in zip(times, times[1:])]
    errors = merged_errors(results)
    return {"failover_gap_s": round(max(gaps, default=0.0), 3), "leader_after_s": round(took, 3),
            "new_leader": new.name, "lost_blocks": after["lost"],
            "wrong_bytes": after["wrong"] + sum(r["wrong"] for r in results),
            "misses_during": sum(r["misses"] for r in results), "errors_during": errors,
            "gets_ok": len(times)}


async def final_read(etcd: str, cluster: str, n: int) -> dict:
    base = base_bytes()
    keys = keys_for(n, "failover")
    lost = wrong = 0
    outs = np.empty((BATCH, BLOCK), np.uint8)
    async with AsyncPoolClient(client_cfg(etcd, cluster)) as pool:
        for start in range(0, n, BATCH):
            idx = list(range(start, min(n, start + BATCH)))
            results = await pool.batch_get([keys[i] for i in idx], list(outs[:len(idx)]))
            for j, (i, r) in enumerate(zip(idx, results)):
                if not r.hit:
                    lost += 1
                elif not np.array_equal(outs[j], block_of(base, i)):
                    wrong += 1
    return {"lost": lost, "wrong": wrong}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode")
    w = sub.add_parser("worker")
    for name in ("--etcd", "--cluster", "--salt"):
        w.add_argument(name, required=True)
    for name in ("--blocks", "--seed"):
        w.add_argument(name, type=int, required=True)
    w.add_argument("--seconds", type=float, required=True)
    w.add_argument("--random", action="store_true")
    w.add_argument("--verify", action="store_true")
    parser.add_argument("--quick", action="store_true", help="less data and shorter windows")
    parser.add_argument("--json", help="write the figures to this file")
    parser.add_argument("--ttl", type=float, default=2.0, help="leader and membership lease (s)")
    args = parser.parse_args()
    if args.mode == "worker":
        print(json.dumps(run_loop(worker(args))))
        return

    total = (64 if args.quick else 256) * MiB
    seconds = 2.0 if args.quick else 5.0
    info = machine('every process on this one machine; NIXL UCX over loopback (CPU DRAM)')
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; {info['setup']}")
    agg = {}
    with tempfile.TemporaryDirectory(prefix="kvpool-bench-cluster-") as tmp:
        for daemons in (1, 2, 3):
            print(f"aggregate get: {daemons} daemon(s), {total // MiB} MiB in 1 MiB blocks, "
                  f"2 client processes for {seconds:.0f} s ...", flush=True)
            agg[str(daemons)] = round(aggregate_get(Path(tmp), daemons, total, seconds), 3)
        print(f"failover: 2 masters, 2 daemons, 2 reading clients, leader SIGKILLed, TTL {args.ttl:.0f} s ...",
              flush=True)
        fo = failover(Path(tmp), total // 2, args.ttl)
    rows = [[f"aggregate get, {d} daemon(s)", f"{v:.2f} GB/s", f"{v / agg['1']:.2f}x of 1 daemon"]
            for d, v in agg.items()]
    rows += [["failover gap (no successful get)", f"{fo['failover_gap_s']:.2f} s",
              f"lease TTL {args.ttl:.0f} s; a ready leader {fo['leader_after_s']:.2f} s after the kill"],
             ["blocks lost across the kill", str(fo["lost_blocks"]), f"of {total // 2 // BLOCK}"],
             ["wrong bytes across the kill", str(fo["wrong_bytes"]), "blocks whose bytes differed"],
             ["errors seen by the clients", str(sum(fo["errors_during"].values())),
              ", ".join(f"{k} {v}" for k, v in fo["errors_during"].items()) or "none"]]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    print()
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "agg_get_gbps": agg, "failover_gap_s": fo["failover_gap_s"],
            "lost_blocks": fo["lost_blocks"], "wrong_bytes": fo["wrong_bytes"], "ttl_s": args.ttl,
            "failover": fo, "quick": args.quick, "machine": info}, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    # Across a leader kill only retryable errors are expected (the clients retry them).
    unexpected = {k: v for k, v in fo["errors_during"].items() if "NOT retryable" in k}
    if fo["wrong_bytes"] or fo["lost_blocks"] or unexpected or not fo["gets_ok"]:
        raise SystemExit(f"failover: {fo['wrong_bytes']} wrong, {fo['lost_blocks']} lost, "
                         f"unexpected errors {unexpected or 'none'}, {fo['gets_ok']} gets served")


if __name__ == "__main__":
    main()
