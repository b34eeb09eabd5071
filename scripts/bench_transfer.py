"""Put/get bandwidth of kvpool against raw NIXL on the same bytes, in one run.

Starts a master and a daemon (`kvpool master`, `kvpool daemon`) and a client process.
The client puts and then gets TOTAL bytes in blocks of 256 KiB .. 16 MiB (batches of
64 MiB), verifies every byte that came back (and the client verifies checksums, as it
does by default), then moves the same descriptors with raw NIXL READs between two plain
processes. Then the same puts and gets on the same-host path (the client copies with the
daemon's arena directly, kvpool.localcopy) against memcpy of the same blocks in one
process (``local_*`` keys). Prints tables; ``--json PATH`` writes the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clients.client import AsyncPoolClient  # noqa: E402
from kvpool.auth import new_secret  # noqa: E402
from kvpool.tasks import run as run_loop  # noqa: E402
from kvpool.config import ClientConfig  # noqa: E402
from kvpool.keys import Namespace, block_keys  # noqa: E402
from kvpool.launcher import spawn, stop  # noqa: E402
from benchlib import machine  # noqa: E402
from kvpool.transfer import TransferAgent  # noqa: E402

MiB = 1 << 20
BATCH = 64 * MiB
SIZES = [256 << 10, 1 * MiB, 4 * MiB, 16 * MiB]
TOKEN_VAR = "KVPOOL_BENCH_TOKEN"  # the client process's credential (not on its command line)



def stamp(base: np.ndarray, size: int, batch: int) -> np.ndarray:
    """The batch's bytes: a shared random base with each block's first 16 bytes unique."""
    data = base.copy()
    blocks = data.reshape(-1, size)
    ids = np.arange(len(blocks), dtype=np.uint64) + np.uint64(batch << 32)
    blocks[:, :8] = ids.view(np.uint8).reshape(-1, 8)
    blocks[:, 8:16] = (ids * np.uint64(0x9E3779B97F4A7C15)).view(np.uint8).reshape(-1, 8)
    return data


async def bench_pool(master: str, total: int, token: str = "", path: str = "nixl") -> dict:
    out: dict = {"sizes": {}}
    rng = np.random.default_rng(7)
    base = rng.integers(0, 256, BATCH, dtype=np.uint8)
    src = np.empty(BATCH, np.uint8)
    dst = np.ones(BATCH, np.uint8)  # touched now: the first get must not pay its page faults
    async with AsyncPoolClient(ClientConfig(master_url=master, token=token, data_path=path)) as pool:
        pool.register(src)
        pool.register(dst)
        for size in SIZES:
            per = BATCH // size
            nbatch = max(1, total // BATCH)
            ns = Namespace("bench", "uint8", "raw", block_tokens=1, salt=f"{size}-{path}")
            keys = block_keys(ns, np.arange(per * nbatch))
            put_s = get_s = 0.0
            verified = True
            for b in range(nbatch):
                src[:] = stamp(base, size, b)
                views = [src[i * size:(i + 1) * size] for i in range(per)]
                t = time.perf_counter()
                res = await pool.batch_put(keys[b * per:(b + 1) * per], views)
                put_s += time.perf_counter() - t
                verified &= all(r.stored for r in res)
            for b in range(nbatch):
                outs = [dst[i * size:(i + 1) * size] for i in range(per)]
                t = time.perf_counter()
                res = await pool.batch_get(keys[b * per:(b + 1) * per], outs)
                get_s += time.perf_counter() - t
                verified &= all(r.hit for r in res) and np.array_equal(dst, stamp(base, size, b))
            pool.cfg = replace(pool.cfg, verify_checksum=False)  # the same gets, unverified
            raw_get_s = 0.0
            for b in range(nbatch):
                outs = [dst[i * size:(i + 1) * size] for i in range(per)]
                t = time.perf_counter()
                await pool.batch_get(keys[b * per:(b + 1) * per], outs)
                raw_get_s += time.perf_counter() - t
            pool.cfg = replace(pool.cfg, verify_checksum=True)
            await pool.batch_remove(keys, force=True)
            out["sizes"][str(size)] = {"put_gbps": per * nbatch * size / put_s / 1e9,
                                       "get_gbps": per * nbatch * size / get_s / 1e9,
                                       "get_noverify_gbps": per * nbatch * size / raw_get_s / 1e9,
                                       "verified": bool(verified)}
            print(f"  kvpool {size >> 10:>6} KiB blocks: put and get done", file=sys.stderr, flush=True)
        one = src[:MiB]
        ns = Namespace("bench-single", "uint8", "raw", block_tokens=1, salt=path)
        keys = block_keys(ns, np.arange(300))
        puts, gets = [], []
        for i, key in enumerate(keys):
            one[:8] = np.frombuffer(np.uint64(i).tobytes(), np.uint8)
            t = time.perf_counter()
            await pool.put(key, one)
            puts.append(time.perf_counter() - t)
        out_buf = dst[:MiB]
        for i in range(1000):
            t = time.perf_counter()
            await pool.get(keys[i % len(keys)], out_buf)
            gets.append(time.perf_counter() - t)
        await pool.batch_remove(keys, force=True)
        pct = lambda xs, q: float(np.percentile(np.array(xs) * 1e3, q))  # noqa: E731
        out["single_1MiB"] = {"put_p50_ms": pct(puts, 50), "put_p99_ms": pct(puts, 99),
                              "get_p50_ms": pct(gets, 50), "get_p99_ms": pct(gets, 99)}
    return out


def raw_target(meta_path: str, total: int) -> None:
    """The other side of the raw NIXL baseline: as many registered bytes as kvpool moves,
    so both read the same amount of distinct memory."""
    agent = TransferAgent(f"bench-raw-target-{os.getpid()}")
    buf = np.empty(total, dtype=np.uint8)
    for off in range(0, total, BATCH):
        buf[off:off + BATCH] = np.random.default_rng(off).integers(0, 256, BATCH, dtype=np.uint8)
    agent.register(buf.ctypes.data, buf.nbytes, owner=buf)
    Path(meta_path + ".tmp").write_bytes(agent.metadata() + b"|" + str(buf.ctypes.data).encode())
    os.replace(meta_path + ".tmp", meta_path)
    sys.stdin.read()  # until the parent closes our stdin


async def bench_raw(total: int) -> dict:
    meta = tempfile.mktemp(prefix="kvpool-raw-")
    proc = subprocess.Popen([sys.executable, __file__, "--role", "raw-target", "--meta", meta,
                             "--total", str(total)], stdin=subprocess.PIPE)
    try:
        while not os.path.exists(meta):
            time.sleep(0.05)
        blob = Path(meta).read_bytes()
        metadata, remote_base = blob.rsplit(b"|", 1)
        agent = TransferAgent(f"bench-raw-client-{os.getpid()}")
        dst = np.empty(BATCH, np.uint8)
        agent.register(dst.ctypes.data, dst.nbytes, owner=dst)
        peer = agent.add_peer(metadata)
        out = {}
        for size in SIZES:
            per = BATCH // size
            local = [(dst.ctypes.data + i * size, size, 0) for i in range(per)]
            nbatch = max(1, total // BATCH)
            remotes = [[(int(remote_base) + b * BATCH + i * size, size, 0) for i in range(per)]
                       for b in range(nbatch)]
            await agent.run("READ", peer, local, "DRAM", remotes[0], "DRAM", 30.0)  # warm up
            t = time.perf_counter()
            for remote in remotes:
                await agent.run("READ", peer, local, "DRAM", remote, "DRAM", 30.0)
            out[str(size)] = nbatch * BATCH / (time.perf_counter() - t) / 1e9
        return out
    finally:
        proc.stdin.close()  # type: ignore[union-attr]
        proc.wait(timeout=30)
        os.unlink(meta)


def bench_memcpy(total: int) -> dict:
    """The baseline of the same-host path: copying the same blocks within one process
    (numpy, from as many distinct bytes as the pool holds), per block size."""
    src = np.random.default_rng(5).integers(0, 256, total, dtype=np.uint8)
    dst = np.ones(BATCH, np.uint8)
    out = {}
    for size in SIZES:
        per = BATCH // size
        t = time.perf_counter()
        for off in range(0, total, BATCH):
            for i in range(per):
                dst[i * size:(i + 1) * size] = src[off + i * size:off + (i + 1) * size]
        out[str(size)] = total / (time.perf_counter() - t) / 1e9
    return out


def measure(total: int, secured: bool, same_host: bool = True) -> dict:
    """One pool (master and daemon processes) and one client process; with ``secured``,
    credentials are configured and the client presents one (the admin's: it also removes
    its blocks by force)."""
    data = tempfile.mkdtemp(prefix="kvpool-bench-")
    print(f"starting master and daemon; {total >> 20} MiB per block size ...", file=sys.stderr)
    tokens = {"cluster": new_secret(), "admin": new_secret()} if secured else {}
    master, info = spawn("kvpool", ["master", "--port", "0"], {
        "KVPOOL_MASTER_CLUSTER_TOKEN": tokens["cluster"], "KVPOOL_MASTER_ADMIN_TOKEN":
        tokens["admin"]} if secured else {}, Path(data) / "master.log")
    daemon = None
    try:
        daemon, _ = spawn("kvpool", ["daemon", "--master", info["master"], "--data-dir", data],
                          {"KVPOOL_DAEMON_HOST_BYTES": str(total + 256 * MiB),
                           "KVPOOL_DAEMON_SSD_BYTES": "0", "KVPOOL_DAEMON_OBJECT_BYTES": "0",
                           "KVPOOL_DAEMON_CLUSTER_TOKEN": tokens.get("cluster", "")},
                          Path(data) / "daemon.log")
        client = subprocess.run([sys.executable, __file__, "--role", "client", "--master",
                                 info["master"], "--total", str(total)]
                                + (["--same-host"] if same_host else []),
                                capture_output=True, text=True, cwd=ROOT,  # it force-removes:
                                env={**os.environ, TOKEN_VAR: tokens.get("admin", "")})
        sys.stderr.write(client.stderr[-4000:] if client.returncode else "")
        if client.returncode:
            raise SystemExit("the client process failed")
        result = json.loads(client.stdout.strip().splitlines()[-1])
    finally:
        for proc in (daemon, master):
            if proc is not None:
                stop(proc, wait_s=30)
    raw = result.pop("raw")
    for size, row in result["sizes"].items():
        row["raw_gbps"] = raw[size]
        row["get_ratio"] = row["get_gbps"] / raw[size]
    result["machine"] = machine('master, daemon and client processes on this one machine; NIXL UCX over loopback (CPU DRAM)')
    result["total_bytes_per_size"] = total
    return result


def report(result: dict) -> None:
    rows = [["block", "put GB/s", "get GB/s", "get unverified", "raw NIXL GB/s", "get/raw",
             "unverified/raw", "bytes verified"]]
    for size, row in result["sizes"].items():
        rows.append([f"{int(size) >> 10} KiB", f"{row['put_gbps']:.2f}", f"{row['get_gbps']:.2f}",
                     f"{row['get_noverify_gbps']:.2f}", f"{row['raw_gbps']:.2f}",
                     f"{row['get_ratio']:.2f}", f"{row['get_noverify_gbps'] / row['raw_gbps']:.2f}",
                     str(row["verified"])])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    s = result["single_1MiB"]
    print(f"single 1 MiB (NIXL): put p50 {s['put_p50_ms']:.3f} ms, p99 {s['put_p99_ms']:.3f} ms; "
          f"get p50 {s['get_p50_ms']:.3f} ms, p99 {s['get_p99_ms']:.3f} ms")
    if "local_get_p50_ms" in s:
        rows = [["block", "same-host put GB/s", "get GB/s (verified)", "get unverified",
                 "memcpy GB/s", "get/memcpy"]]
        for size, row in result["sizes"].items():
            rows.append([f"{int(size) >> 10} KiB", f"{row['local_put_gbps']:.2f}",
                         f"{row['local_get_gbps']:.2f}", f"{row['local_get_noverify_gbps']:.2f}",
                         f"{row['memcpy_gbps']:.2f}", f"{row['local_ratio']:.2f}"])
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
        print(f"single 1 MiB (same-host): put p50 {s['local_put_p50_ms']:.3f} ms, p99 "
              f"{s['local_put_p99_ms']:.3f} ms; get p50 {s['local_get_p50_ms']:.3f} ms, p99 "
              f"{s['local_get_p99_ms']:.3f} ms")
    m = result["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {m['setup']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="256 MiB per block size instead of 2 GiB")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    parser.add_argument("--role", choices=["client", "raw-target"], help=argparse.SUPPRESS)
    parser.add_argument("--master", help=argparse.SUPPRESS)
    parser.add_argument("--meta", help=argparse.SUPPRESS)
    parser.add_argument("--total", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--same-host", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--credentials", choices=["off", "on", "both"], default="off",
                        help="run the pool with credentials configured, without, or both "
                             "one after the other (and print their ratios)")
    args = parser.parse_args()
    if args.role == "raw-target":
        return raw_target(args.meta, args.total)
    if args.role == "client":
        token = os.environ.get(TOKEN_VAR, "")
        result = run_loop(bench_pool(args.master, args.total, token, "nixl"))
        result["raw"] = run_loop(bench_raw(args.total))
        if args.same_host:
            local = run_loop(bench_pool(args.master, args.total, token, "same-host"))
            memcpy = bench_memcpy(args.total)
            for size, row in result["sizes"].items():
                lrow = local["sizes"][size]
                row.update(local_get_gbps=lrow["get_gbps"], local_put_gbps=lrow["put_gbps"],
                           local_get_noverify_gbps=lrow["get_noverify_gbps"],
                           memcpy_gbps=memcpy[size], local_ratio=lrow["get_gbps"] / memcpy[size])
                row["verified"] = row["verified"] and lrow["verified"]
            result["single_1MiB"].update(local_get_p50_ms=local["single_1MiB"]["get_p50_ms"],
                                         local_get_p99_ms=local["single_1MiB"]["get_p99_ms"],
                                         local_put_p50_ms=local["single_1MiB"]["put_p50_ms"],
                                         local_put_p99_ms=local["single_1MiB"]["put_p99_ms"])
        print(json.dumps(result))
        return
    total = (256 if args.quick else 2048) * MiB
    runs = {mode: measure(total, mode == "on")
            for mode in (["off", "on"] if args.credentials == "both" else [args.credentials])}
    for mode, result in runs.items():
        print(f"credentials {mode}:")
        report(result)
    if len(runs) == 2:
        off, on = runs["off"], runs["on"]
        print("credentials on / off:")
        for size in off["sizes"]:
            a, b = off["sizes"][size], on["sizes"][size]
            print(f"  {int(size) >> 10:>6} KiB  put {b['put_gbps'] / a['put_gbps']:.3f}  "
                  f"get {b['get_gbps'] / a['get_gbps']:.3f}")
        a1, b1 = off["single_1MiB"], on["single_1MiB"]
        print(f"  single 1 MiB p50: put {b1['put_p50_ms'] / a1['put_p50_ms']:.3f}  "
              f"get {b1['get_p50_ms'] / a1['get_p50_ms']:.3f}")
    result = runs["off"] if len(runs) == 2 else next(iter(runs.values()))
    if len(runs) == 2:
        result = {**result, "credentials_on": runs["on"]}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
