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
import json
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import machine  # noqa: E402
from loadgen import BLOCK, Workers, check_pool, merge  # noqa: E402
from kvpool.launcher import spawn, stop  # noqa: E402

MiB = 1 << 20
RETRY_FOR_S = 30.0  # a retryable refusal is retried this long before it counts as an error


def run(clients: int, seconds: float) -> dict:
    data = tempfile.mkdtemp(prefix="kvpool-bench-load-")
    env = {"KVPOOL_DAEMON_HOST_BYTES": "512MiB", "KVPOOL_DAEMON_SSD_BYTES": "4GiB",
           "KVPOOL_DAEMON_OBJECT_BYTES": "0"}
    up, info = spawn("kvpool", ["up", "--port", "0", "--data-dir", data], env, Path(data) / "up.log")
    try:
        master = info["master"]
        workers = Workers(["--master", master], clients)
        try:
            workers.broadcast(f"phase load {RETRY_FOR_S}")
            workers.start()
            time.sleep(seconds + 0.2)
            results = workers.stop(timeout_s=120)
        finally:
            workers.kill()
        check_ok, check_msg = check_pool(master)
        with urllib.request.urlopen(master + "/metrics", timeout=30) as resp:
            ops = {line.split('"')[1]: int(float(line.rsplit(" ", 1)[1]))
                   for line in resp.read().decode().splitlines()
                   if line.startswith("kvpool_ops_total")}
    finally:
        t = time.monotonic()
        stop(up, signal.SIGTERM)
        stop_s = time.monotonic() - t
    load = merge(results, "load")
    if load["untyped"]:
        raise SystemExit(f"untyped errors: {load['untyped'][:5]}")
    return {"clients": clients, "seconds": seconds, "block_bytes": BLOCK,
            "put_ms": load["put_ms"], "get_ms": load["get_ms"], "errors": load["errors"],
            "wrong_bytes": load["wrong"], "misses": load["misses"], "blocks_put": load["stored"],
            "check_ok": check_ok, "check": check_msg, "master_ops": ops,
            "sigterm_exit_s": round(stop_s, 2), "up_exit_code": up.returncode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--quick", action="store_true", help="a 8 s window")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
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
