"""Tail latency under load: client processes putting and getting 256 KiB blocks on one pool.

Starts `kvpool up` (host arena 512 MiB, SSD 4 GiB: demotion runs through the run) and N
client processes. Each runs a closed loop for the window, alternating a put of a new
block and a get of one of its own earlier blocks (verified byte for byte). A typed,
retryable refusal (TooManyPending, NotReady, ...) is retried and counts as latency, not
as an error. Reports p50/p99/max of put and get, errors by type, wrong bytes, misses,
and whether the master's `check` passes at the end; exits non-zero on any error, wrong
byte or failed check. ``--json PATH`` writes the figures, ``--quick`` runs a short window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import machine  # noqa: E402
from clients.client import AsyncPoolClient  # noqa: E402
from kvpool.config import ClientConfig  # noqa: E402
from kvpool.errors import KVPoolError  # noqa: E402
from kvpool.keys import Namespace, block_keys  # noqa: E402
from kvpool.launcher import spawn, stop  # noqa: E402
from kvpool.wire import RpcClient  # noqa: E402

KiB, MiB = 1 << 10, 1 << 20
BLOCK = 256 * KiB
RETRY_FOR_S = 30.0  # a retryable refusal is retried this long before it counts as an error


def block_of(seed: int, i: int) -> np.ndarray:
    """Block ``i`` of client ``seed``: unique leading bytes over a cheap pattern."""
    data = np.full(BLOCK, (seed * 31 + i) % 251, np.uint8)
    data[:16] = np.frombuffer(np.array([seed, i], np.uint64).tobytes(), np.uint8)
    return data


async def worker(master: str, seed: int, seconds: float) -> dict:
    keys = block_keys(Namespace("bench-load", "uint8", "raw", block_tokens=1, salt=str(seed)),
                      np.arange(200_000))
    rng = np.random.default_rng(seed)
    out = np.empty(BLOCK, np.uint8)
    put_ms: list[float] = []
    get_ms: list[float] = []
    errors: dict[str, int] = {}
    wrong = misses = 0
    stored = 0

    async def timed(op):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        deadline = t + RETRY_FOR_S
        while True:
            try:
                res = await op()
                return res, (time.perf_counter() - t) * 1000
            except KVPoolError as exc:
                if not exc.retryable or time.perf_counter() > deadline:
                    raise
                await asyncio.sleep(0.005)

    async with AsyncPoolClient(ClientConfig(master_url=master)) as pool:
        pool.register(out)
        values = [block_of(seed, i) for i in range(64)]  # reused buffers, re-stamped per put
        print("ready", flush=True)  # connected; the window starts when every client is
        start = float(await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline))
        while time.time() < start:
            await asyncio.sleep(0.001)
        until = start + seconds
        while time.time() < until:
            try:
                value = values[stored % 64]
                value[:] = block_of(seed, stored)
                _, ms = await timed(lambda: pool.put(keys[stored], value))
                put_ms.append(ms)
                stored += 1
                i = int(rng.integers(0, stored))
                res, ms = await timed(lambda: pool.get(keys[i], out))
                get_ms.append(ms)
                if res is None:
                    misses += 1
                elif not np.array_equal(out, block_of(seed, i)):
                    wrong += 1
            except KVPoolError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
    return {"put_ms": put_ms, "get_ms": get_ms, "errors": errors, "wrong": wrong,
            "misses": misses, "stored": stored}


def pct(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0, "n": 0}
    arr = np.asarray(values)
    return {"p50": round(float(np.percentile(arr, 50)), 2), "p99": round(float(np.percentile(arr, 99)), 2),
            "max": round(float(arr.max()), 2), "n": len(values)}


async def check(master: str) -> tuple[bool, str]:
    rpc = RpcClient(master, timeout_s=60)
    try:
        await rpc.call("check")
        return True, "ok"
    except KVPoolError as exc:
        return False, str(exc)
    finally:
        await rpc.close()


def run(clients: int, seconds: float) -> dict:
    data = tempfile.mkdtemp(prefix="kvpool-bench-load-")
    env = {"KVPOOL_DAEMON_HOST_BYTES": "512MiB", "KVPOOL_DAEMON_SSD_BYTES": "4GiB",
           "KVPOOL_DAEMON_OBJECT_BYTES": "0"}
    up, info = spawn("kvpool", ["up", "--port", "0", "--data-dir", data], env, Path(data) / "up.log")
    try:
        master = info["master"]
        procs = [subprocess.Popen([sys.executable, __file__, "worker", "--master", master,
                                   "--seed", str(i), "--seconds", str(seconds)],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
                 for i in range(clients)]
        for p in procs:
            if p.stdout.readline().strip() != b"ready":  # type: ignore[union-attr]
                raise SystemExit("a client process failed to start")
        start = time.time() + 0.2
        for p in procs:
            p.stdin.write(f"{start}\n".encode())  # type: ignore[union-attr]
            p.stdin.flush()  # type: ignore[union-attr]
        results = []
        for p in procs:
            stdout, _ = p.communicate(timeout=seconds + 120)
            if p.returncode != 0:
                raise SystemExit(f"a client process failed with exit code {p.returncode}")
            results.append(json.loads(stdout.decode().strip().splitlines()[-1]))
        check_ok, check_msg = asyncio.run(check(master))
        with urllib.request.urlopen(master + "/metrics", timeout=30) as resp:
            ops = {line.split('"')[1]: int(line.rsplit(" ", 1)[1])
                   for line in resp.read().decode().splitlines()
                   if line.startswith("kvpool_ops_total")}
    finally:
        t = time.monotonic()
        stop(up, signal.SIGTERM)
        stop_s = time.monotonic() - t
    errors: dict[str, int] = {}
    for r in results:
        for k, v in r["errors"].items():
            errors[k] = errors.get(k, 0) + v
    return {"clients": clients, "seconds": seconds, "block_bytes": BLOCK,
            "put_ms": pct([x for r in results for x in r["put_ms"]]),
            "get_ms": pct([x for r in results for x in r["get_ms"]]),
            "errors": errors, "wrong_bytes": sum(r["wrong"] for r in results),
            "misses": sum(r["misses"] for r in results),
            "blocks_put": sum(r["stored"] for r in results), "check_ok": check_ok,
            "check": check_msg, "master_ops": ops, "sigterm_exit_s": round(stop_s, 2), "up_exit_code": up.returncode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode")
    w = sub.add_parser("worker")
    w.add_argument("--master", required=True)
    w.add_argument("--seed", type=int, required=True)
    w.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--quick", action="store_true", help="a 8 s window")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    if args.mode == "worker":
        print(json.dumps(asyncio.run(worker(args.master, args.seed, args.seconds))))
        return
    seconds = 8.0 if args.quick else args.seconds
    info = machine("kvpool up (host arena 512 MiB, SSD 4 GiB) and every client process on "
                   "this one machine; NIXL UCX over loopback")
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; {info['setup']}")
    print(f"{args.clients} clients, closed loop of put + get of 256 KiB blocks, {seconds:.0f} s ...",
          flush=True)
    res = run(args.clients, seconds)
    rows = [["op", "calls", "p50 ms", "p99 ms", "max ms"]]
    for op in ("put", "get"):
        s = res[f"{op}_ms"]
        rows.append([op, str(s["n"]), f"{s['p50']:.2f}", f"{s['p99']:.2f}", f"{s['max']:.1f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print()
    for r in rows:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    print(f"\nerrors {res['errors'] or 'none'}; wrong bytes {res['wrong_bytes']}; misses "
          f"{res['misses']}; blocks put {res['blocks_put']}; check {res['check']}; "
          f"`kvpool up` exited {res['up_exit_code']} {res['sigterm_exit_s']:.2f} s after SIGTERM")
    moves = {k: v for k, v in res["master_ops"].items() if k.startswith(("demoted", "room", "promoted"))}
    print(f"master: {moves}")
    if args.json:
        Path(args.json).write_text(json.dumps({"load": res, "quick": args.quick, "machine": info},
                                              indent=2) + "\n")
        print(f"wrote {args.json}")
    if (res["errors"] or res["wrong_bytes"] or not res["check_ok"] or res["up_exit_code"] != 0
            or not res["put_ms"]["n"] or not res["get_ms"]["n"]):
        raise SystemExit("unexpected errors, wrong bytes, a failed check, no calls or an "
                         "unclean exit (above)")


if __name__ == "__main__":
    main()
