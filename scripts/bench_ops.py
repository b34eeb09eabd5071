"""Per-call cost of kvpool's hot calls, against a bare blocking-socket ping-pong in the same run.

Starts a master and a daemon (`kvpool master`, `kvpool daemon`, processes of their own);
this process is the one client. With one call in flight it measures calls per second and
p50/p99 per call of: exists (one key), match_prefix (one key), get of distinct 64 KiB
blocks, get of one hot 64 KiB block, put of a 64 KiB block; then exists with 16 calls in
flight, and keys per second of exists and match_prefix over 1000-key batches. The
baseline is a request/response ping-pong of small messages in plain Python over blocking
loopback TCP sockets between this process and a child (no framework, one call in flight),
with the same over a Unix socket beside it. Every get is checked byte for byte. ``--rpc``
names the transports measured one after the other against the same pool (by default the
stream RPC over TCP, then over the master's local Unix socket, which a client on its host
takes by itself), for a ratio within one run. The client runs on uvloop, as engines do.
``--auth both`` runs everything twice, on a pool without credentials and on one with them
(cluster, admin and viewer credentials, and the client as a tenant with quotas, its keys
under an HMAC-keyed namespace root), and prints the ratio on/off per call; then, with both
pools up at once and a third without credentials as a control, it rotates single calls
between them (so that the load of a shared machine weighs on all alike) and quotes the
ratios of their median times, on/off beside control/off (how far two like pools differ).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clients.client import AsyncPoolClient  # noqa: E402
from clients.sync import PoolClient  # noqa: E402
from kvpool import localcopy  # noqa: E402
from kvpool.tasks import run as run_loop  # noqa: E402
from kvpool.auth import new_secret  # noqa: E402
from kvpool.config import ClientConfig  # noqa: E402
from kvpool.errors import KVPoolError  # noqa: E402
from kvpool.keys import Namespace, block_keys  # noqa: E402
from kvpool.launcher import spawn, stop  # noqa: E402
from benchlib import machine  # noqa: E402

BLOCK = 64 << 10
ARENA_BYTES = 1536 << 20  # holds a full run's stored blocks (10,000 x 64 KiB) and its puts
# The hot RPC's transports a run may measure: the WebSocket RPC, the stream RPC over TCP, and
# the stream RPC over the master's local Unix socket (a client's choice on the master's host).
RPCS = {"ws": {"rpc": "ws"}, "tcp": {"rpc": "stream", "rpc_socket": "tcp"},
        "unix": {"rpc": "stream", "rpc_socket": "unix"}}
OPS = ["exists", "match_one", "get_64k", "hot_get_64k", "put_64k", "exists_16_in_flight", "pingpong"]
_LEN = struct.Struct("<I")


# -- the baseline: a bare ping-pong over blocking sockets ------------------------------------

def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed")
        buf += chunk
    return bytes(buf)


def pingpong_server(port_file: str, unix: bool) -> None:
    """Echo length-prefixed messages to one peer until it hangs up."""
    if unix:
        srv = socket.socket(socket.AF_UNIX)
        srv.bind("\0" + Path(port_file).name)
    else:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    Path(port_file + ".tmp").write_text(str(srv.getsockname()[1]) if not unix else "unix")
    os.replace(port_file + ".tmp", port_file)
    conn, _ = srv.accept()
    if not unix:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            (n,) = _LEN.unpack(_recv_exact(conn, 4))
            body = _recv_exact(conn, n)
            conn.sendall(_LEN.pack(len(body)) + body)
    except ConnectionError:
        pass


def pingpong(calls: int, unix: bool = False) -> list[float]:
    """The baseline over loopback TCP (``unix``: over a Unix socket, the local RPC's kind)."""
    port_file = tempfile.mktemp(prefix="kvpool-pingpong-")
    proc = subprocess.Popen([sys.executable, __file__, "--role", "pingpong-server",
                             "--port-file", port_file, *(["--unix"] if unix else [])])
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(port_file):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit("the ping-pong server did not start")
            time.sleep(0.02)
        if unix:
            sock = socket.socket(socket.AF_UNIX)
            sock.connect("\0" + Path(port_file).name)
        else:
            sock = socket.create_connection(("127.0.0.1", int(Path(port_file).read_text())))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        msg = b"x" * 48
        frame = _LEN.pack(len(msg)) + msg
        times = []
        for _ in range(calls):
            t = time.perf_counter()
            sock.sendall(frame)
            (n,) = _LEN.unpack(_recv_exact(sock, 4))
            if _recv_exact(sock, n) != msg:
                raise SystemExit("the ping-pong echo came back wrong")
            times.append(time.perf_counter() - t)
        sock.close()
        return times
    finally:
        proc.wait(timeout=30)
        os.unlink(port_file)


# -- the pool's calls ---------------------------------------------------------------------------

def _stats(times: list[float], calls: int | None = None, wall: float | None = None) -> dict:
    arr = np.array(times) * 1e3
    per_s = (calls / wall) if calls is not None and wall else len(times) / sum(times)
    return {"per_s": per_s, "p50_ms": float(np.percentile(arr, 50)),
            "p99_ms": float(np.percentile(arr, 99))}


async def _timed(n: int, op) -> list[float]:  # type: ignore[no-untyped-def]
    times = []
    for i in range(n):
        t = time.perf_counter()
        await op(i)
        times.append(time.perf_counter() - t)
    return times


def _block(i: int) -> np.ndarray:
    data = np.full(BLOCK, i & 0xFF, dtype=np.uint8)
    data[:8] = np.frombuffer(np.uint64(i).tobytes(), np.uint8)
    return data


async def _cleanup(pool: AsyncPoolClient, keys: list, tenant: bool) -> None:
    """Make room for the next run: an admin's forced remove, or a tenant's own (whose
    blocks an admin credential, of no tenant, does not name); a block still leased stays."""
    try:
        await pool.batch_remove(keys, force=not tenant)
    except KVPoolError:
        pass


async def bench_pool(master: str, calls: int, rpc: str, salt: str, path: str,
                     creds: dict[str, str]) -> dict:
    """Every figure of one RPC transport (``rpc``) and data path against the running pool."""
    out: dict = {}
    cfg = ClientConfig(master_url=master, **RPCS[rpc], data_path=path,
                       token=creds.get("client", ""), key_secret=creds.get("keys", ""))
    ns = Namespace("bench-ops", "uint8", "raw", block_tokens=1, salt=salt, secret=cfg.key_secret)
    nblocks = calls
    keys = block_keys(ns, np.arange(nblocks + calls + 1000))
    stored, fresh, batch = keys[:nblocks], keys[nblocks:nblocks + calls], keys[nblocks + calls:]
    async with AsyncPoolClient(cfg) as pool:
        src = np.empty(nblocks * BLOCK, np.uint8)
        for i in range(nblocks):
            src[i * BLOCK:(i + 1) * BLOCK] = _block(i)
        pool.register(src)
        views = [src[i * BLOCK:(i + 1) * BLOCK] for i in range(nblocks)]
        for s in range(0, nblocks, 256):
            res = await pool.batch_put(stored[s:s + 256], views[s:s + 256])
            if not all(r.stored for r in res):
                raise SystemExit("setup: a block that should be new already existed")
        dst = np.empty(BLOCK, np.uint8)
        pool.register(dst)
        for k in stored[:50]:  # warm up: connection, NIXL peer, registrations
            await pool.exists(k)
            await pool.get(k, dst)
        if pool.rpc_over != rpc:
            raise SystemExit(f"asked for the {rpc} RPC, the client runs on {pool.rpc_over}")

        async def exists(i: int) -> None:
            if not await pool.exists(stored[i % nblocks]):
                raise SystemExit("exists said no for a stored block")

        async def match_one(i: int) -> None:
            if await pool.match_prefix([stored[i % nblocks]]) != 1:
                raise SystemExit("match_prefix missed a stored block")

        async def get(i: int) -> None:
            if await pool.get(stored[i % nblocks], dst) is None:
                raise SystemExit("a get missed a stored block")

        hot = stored[0]

        async def hot_get(i: int) -> None:
            if await pool.get(hot, dst) is None:
                raise SystemExit("a get missed the hot block")

        put_src = np.empty(BLOCK, np.uint8)
        pool.register(put_src)

        async def put(i: int) -> None:
            put_src[:8] = np.frombuffer(np.uint64(i).tobytes(), np.uint8)
            if not (await pool.put(fresh[i], put_src)).stored:
                raise SystemExit("a put of a new key stored nothing")

        out["exists"] = _stats(await _timed(calls, exists))
        out["match_one"] = _stats(await _timed(calls, match_one))
        times = []
        for i in range(calls):  # distinct blocks, each checked byte for byte
            t = time.perf_counter()
            await get(i)
            times.append(time.perf_counter() - t)
            if not np.array_equal(dst, views[i % nblocks]):
                raise SystemExit(f"get {i} returned wrong bytes")
        out["get_64k"] = _stats(times)
        out["hot_get_64k"] = _stats(await _timed(calls, hot_get))
        if not np.array_equal(dst, views[0]):
            raise SystemExit("the hot get returned wrong bytes")
        out["put_64k"] = _stats(await _timed(calls, put))

        per_task = max(1, calls // 16)
        lat: list[float] = []

        async def worker(w: int) -> None:
            for i in range(per_task):
                t = time.perf_counter()
                await exists(w * per_task + i)
                lat.append(time.perf_counter() - t)

        t = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(16)))
        out["exists_16_in_flight"] = _stats(lat, 16 * per_task, time.perf_counter() - t)

        res = await pool.batch_put(batch, [views[i % nblocks] for i in range(1000)])
        rounds = max(5, calls // 200)
        t = time.perf_counter()
        for _ in range(rounds):
            if not all(await pool.batch_exists(batch)):
                raise SystemExit("batch exists missed stored blocks")
        exists_kps = rounds * 1000 / (time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(rounds):
            if await pool.match_prefix(batch) != 1000:
                raise SystemExit("match_prefix over 1000 stored keys did not match them all")
        match_kps = rounds * 1000 / (time.perf_counter() - t)
        out["batch_keys_per_s"] = {"exists": exists_kps, "match_prefix": match_kps}
        await _cleanup(pool, list(fresh) + list(batch), bool(creds))
    return out


def bench_sync(master: str, calls: int, rpc: str, salt: str, path: str,
               creds: dict[str, str]) -> dict:
    """The blocking client's exists (from this thread) over the blocks bench_pool left."""
    cfg = ClientConfig(master_url=master, **RPCS[rpc], data_path=path,
                       token=creds.get("client", ""), key_secret=creds.get("keys", ""))
    ns = Namespace("bench-ops", "uint8", "raw", block_tokens=1, salt=salt, secret=cfg.key_secret)
    stored = block_keys(ns, np.arange(calls))
    with PoolClient(cfg) as sync:
        for k in stored[:50]:
            sync.exists(k)
        times = []
        for i in range(calls):
            t = time.perf_counter()
            if not sync.exists(stored[i]):
                raise SystemExit("the blocking client's exists said no for a stored block")
            times.append(time.perf_counter() - t)
        try:
            sync.batch_remove(stored, force=not creds)
        except KVPoolError:
            pass
    return _stats(times)


def _secured(data: str) -> tuple[dict[str, str], list[str], dict[str, str]]:
    """Credentials for every role, the client as tenant "bench" (quotas it will not reach,
    so the checks run but never refuse): the master's arguments and the daemon's env."""
    creds = {role: new_secret() for role in ("cluster", "admin", "viewer", "client", "keys")}
    config = Path(data) / "master.toml"
    config.write_text(f"""[master]
cluster_token = "{creds['cluster']}"
admin_token = "{creds['admin']}"
viewer_token = "{creds['viewer']}"

[[master.tenants]]
name = "bench"
token = "{creds['client']}"
quota_bytes = {{host = "4GiB", gpu = "4GiB"}}
max_puts = 100000
""")
    config.chmod(0o600)
    return creds, ["--config", str(config)], {"KVPOOL_DAEMON_CLUSTER_TOKEN": creds["cluster"]}


def _start(data: str, secured: bool) -> tuple[list, str, dict[str, str]]:
    """A master and a daemon (credentials on or off): their processes, the master's URL, the
    credentials."""
    creds, args, env = _secured(data) if secured else ({}, [], {})
    master, info = spawn("kvpool", ["master", "--port", "0", *args], {}, Path(data) / "master.log")
    try:
        daemon, _ = spawn("kvpool", ["daemon", "--master", info["master"], "--data-dir", data],
                          {"KVPOOL_DAEMON_HOST_BYTES": str(ARENA_BYTES),
                           "KVPOOL_DAEMON_SSD_BYTES": "0", "KVPOOL_DAEMON_OBJECT_BYTES": "0", **env},
                          Path(data) / "daemon.log")
    except BaseException:
        stop(master, wait_s=30)
        raise
    return [daemon, master], info["master"], creds


# The pools the A/B calls alternate between: without credentials, a second one without
# (the control: how far two like pools differ on this machine), and one with them.
AB_POOLS = {"off": False, "control": False, "on": True}


async def _ab_calls(pools: dict[str, tuple[str, dict[str, str]]], calls: int) -> dict[str, dict]:
    """Per call type: ``calls`` rounds of one call on each pool, back to back (the order
    rotates), so that every side sees the same moments of a shared machine; the median time
    per call of each side, and the ratios on/off and control/off (the noise floor)."""
    n = calls
    clients, keys, bufs = {}, {}, {}
    for name, (url, creds) in pools.items():
        cfg = ClientConfig(master_url=url, token=creds.get("client", ""),
                           key_secret=creds.get("keys", ""))
        ns = Namespace("bench-ab", "uint8", "raw", block_tokens=1, secret=cfg.key_secret)
        client = clients[name] = AsyncPoolClient(cfg)
        keys[name] = block_keys(ns, np.arange(2 * n))
        src, dst = np.empty(BLOCK, np.uint8), np.empty(BLOCK, np.uint8)
        client.register(src)
        client.register(dst)
        bufs[name] = (src, dst)
        for s in range(0, n, 256):
            await client.batch_put(keys[name][s:min(n, s + 256)], [src] * (min(n, s + 256) - s))
        for k in keys[name][:50]:
            await client.exists(k)
            await client.get(k, dst)

    def op(call: str, pool: str):  # type: ignore[no-untyped-def]
        c, ks, (src, dst) = clients[pool], keys[pool], bufs[pool]
        if call == "exists":
            return lambda i: c.exists(ks[i])
        if call == "match_one":
            return lambda i: c.match_prefix([ks[i]])
        if call == "get_64k":
            return lambda i: c.get(ks[i], dst)
        return lambda i: c.put(ks[n + i], src)  # put_64k: fresh keys

    out = {}
    names = list(pools)
    try:
        for call in ("exists", "match_one", "get_64k", "put_64k"):
            calls_of = {name: op(call, name) for name in names}
            times: dict[str, list[float]] = {name: [] for name in names}
            for i in range(n):
                for j in range(len(names)):
                    name = names[(i + j) % len(names)]
                    t = time.perf_counter()
                    await calls_of[name](i)
                    times[name].append(time.perf_counter() - t)
            p50 = {name: float(np.median(times[name])) for name in names}
            out[call] = {**{f"{name}_p50_ms": p50[name] * 1e3 for name in names},
                         "on_over_off": p50["off"] / p50["on"],
                         "control_over_off": p50["off"] / p50["control"]}
    finally:
        for c in clients.values():
            await c.close()
    return out


def credential_work_us(calls: int = 200_000) -> dict[str, float]:
    """What credentials add to a call inside the master, timed in this process on the
    master's own code: the role check (a set lookup, the credential itself being checked
    once per connection at its hello) and the scoped key of each key the call names
    (a keyed blake2b of the tenant's scope), each less the same step without credentials."""
    import timeit  # noqa: PLC0415
    from kvpool.auth import Role  # noqa: PLC0415
    from kvpool.wire import connection_guard  # noqa: PLC0415
    from master.http import ROLES  # noqa: PLC0415
    from master.tenants import Scope  # noqa: PLC0415
    key = os.urandom(16)
    plain, scoped = Scope("", False), Scope("bench-tenant", True)
    allowed = connection_guard(Role.CLIENT, ROLES)[0]  # what kvpool.wire.respond looks up
    off = timeit.timeit(lambda: plain.keys([key]), number=calls) / calls
    on = timeit.timeit(lambda: ("exists" in allowed, scoped.keys([key])), number=calls) / calls
    return {"per_call_one_key_us": (on - off) * 1e6}


def interleaved(calls: int) -> dict[str, dict]:
    """The AB_POOLS up at once, calls alternating between them one by one."""
    started = []
    try:
        pools = {}
        for name, secured in AB_POOLS.items():
            procs, url, creds = _start(tempfile.mkdtemp(prefix="kvpool-bench-ab-"), secured)
            started += procs
            pools[name] = (url, creds)
        return run_loop(_ab_calls(pools, calls))
    finally:
        for proc in started:
            stop(proc, wait_s=30)


def measure(calls: int, rpcs: list[str], path: str, secured: bool = False) -> dict:
    procs, url, creds = _start(tempfile.mkdtemp(prefix="kvpool-bench-ops-"), secured)
    try:
        runs = {}
        ping, ping_unix = pingpong(calls), pingpong(calls, unix=True)
        for n, rpc in enumerate(rpcs):
            runs[rpc] = run_loop(bench_pool(url, calls, rpc, f"{rpc}-{n}", path, creds))
            runs[rpc]["exists_sync"] = bench_sync(url, calls, rpc, f"{rpc}-{n}", path, creds)
        ping2, ping_unix2 = pingpong(calls), pingpong(calls, unix=True)  # before and after
        if path == "auto":  # what the client chose: the same-host copy when it can
            req = urllib.request.Request(url + "/v1/nodes", headers={
                "Authorization": f"Bearer {creds['viewer']}"} if creds else {})
            with urllib.request.urlopen(req, timeout=10) as resp:
                agent = json.loads(resp.read())["nodes"][0]["agent"]
            path = "same-host" if localcopy.local_pid(agent) else "nixl"
        runs_ping = _stats(ping + ping2)
        runs_ping_unix = _stats(ping_unix + ping_unix2)
    finally:
        for proc in procs:
            stop(proc, wait_s=30)
    return {"runs": runs, "pingpong": runs_ping, "pingpong_unix": runs_ping_unix, "path": path}


def shape(run: dict, ping: dict, ping_unix: dict, path: str) -> dict:
    """The JSON the issue asks for, from one transport's run; ``pingpong`` is over loopback
    TCP, as the issue names it, and ``pingpong_unix`` the same over a Unix socket."""
    figures = {**{k: v for k, v in run.items() if k in OPS}, "pingpong": ping}
    return {"per_s": {k: figures[k]["per_s"] for k in OPS},
            "p50_ms": {k: figures[k]["p50_ms"] for k in OPS},
            "p99_ms": {k: figures[k]["p99_ms"] for k in OPS},
            "ratio_to_pingpong": {k: figures[k]["per_s"] / ping["per_s"] for k in OPS},
            "batch_keys_per_s": run["batch_keys_per_s"],
            "sync_client": run["exists_sync"],
            "pingpong_unix": ping_unix,
            "path": path}


def report(name: str, result: dict) -> None:
    print(f"rpc {name} (path {result['path']}):")
    rows = [["call", "calls/s", "p50 ms", "p99 ms", "/pingpong"]]
    for k in OPS:
        rows.append([k, f"{result['per_s'][k]:.0f}", f"{result['p50_ms'][k]:.3f}",
                     f"{result['p99_ms'][k]:.3f}", f"{result['ratio_to_pingpong'][k]:.2f}"])
    s = result["sync_client"]
    rows.append(["exists (sync client)", f"{s['per_s']:.0f}", f"{s['p50_ms']:.3f}",
                 f"{s['p99_ms']:.3f}", f"{s['per_s'] / result['per_s']['pingpong']:.2f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))
    u = result["pingpong_unix"]
    print(f"  (ping-pong over a Unix socket: {u['per_s']:.0f} calls/s, p50 {u['p50_ms']:.3f} ms)")
    b = result["batch_keys_per_s"]
    print(f"  1000-key batches: exists {b['exists']:.0f} keys/s, match_prefix {b['match_prefix']:.0f} keys/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2000 calls per figure instead of 10000")
    parser.add_argument("--json", metavar="PATH", help="write the figures as JSON")
    parser.add_argument("--path", choices=["auto", "nixl", "same-host"], default="auto",
                        help="force the data path of gets and puts: NIXL, or the same-host "
                             "copy (auto: the client's choice; the JSON says which)")
    parser.add_argument("--rpc", default="tcp,unix",
                        help="the hot RPC's transports, one after the other (comma-separated: "
                             "ws, tcp, unix; the stream RPC on TCP or on the master's local Unix "
                             "socket); the JSON's top level is the last, rpc_<name> the others")
    parser.add_argument("--auth", choices=["off", "on", "both"], default="off",
                        help="credentials and tenants off, on, or both one after the other on "
                             "pools of their own (the JSON's top level is the last; both adds "
                             "auth_off and the ratio on/off)")
    parser.add_argument("--role", choices=["pingpong-server"], help=argparse.SUPPRESS)
    parser.add_argument("--port-file", help=argparse.SUPPRESS)
    parser.add_argument("--unix", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "pingpong-server":
        return pingpong_server(args.port_file, args.unix)
    rpcs = args.rpc.split(",")
    if not rpcs or any(r not in RPCS for r in rpcs):
        parser.error(f"--rpc {args.rpc}: name some of {', '.join(RPCS)}")
    calls = 2000 if args.quick else 10000
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.auth]
    by_mode = {}
    for secured in modes:
        measured = measure(calls, rpcs, args.path, secured)
        results = {rpc: shape(run, measured["pingpong"], measured["pingpong_unix"], measured["path"])
                   for rpc, run in measured["runs"].items()}
        print(f"credentials {'on (tenant client)' if secured else 'off'}:")
        for rpc, result in results.items():
            report(rpc, result)
        by_mode[secured] = results
    auth_ratio = None
    if len(by_mode) == 2:
        off, on = by_mode[False][rpcs[-1]], by_mode[True][rpcs[-1]]
        auth_ratio = {k: on["per_s"][k] / off["per_s"][k] for k in OPS if k != "pingpong"}
        auth_ratio["pingpong"] = on["per_s"]["pingpong"] / off["per_s"]["pingpong"]
        print(f"credentials on / off, calls per second (rpc {rpcs[-1]}, runs one after "
              "the other):  " + "  ".join(f"{k} {v:.3f}" for k, v in auth_ratio.items()))
        ab = interleaved(calls)
        print("credentials on / off, calls rotating one by one between three pools up at once "
              "(median time per call; control: a second pool without credentials):")
        for name, row in ab.items():
            print(f"  {name:<10} off {row['off_p50_ms']:6.3f} ms  control {row['control_p50_ms']:6.3f} ms  "
                  f"on {row['on_p50_ms']:6.3f} ms   calls/s on/off {row['on_over_off']:.3f}  "
                  f"control/off {row['control_over_off']:.3f}")
        work = credential_work_us()
        work["of_exists_p50"] = work["per_call_one_key_us"] / 1e3 / ab["exists"]["on_p50_ms"]
        print(f"work credentials add to a one-key call in the master: "
              f"{work['per_call_one_key_us']:.2f} us, {100 * work['of_exists_p50']:.2f}% of an exists call")
    if len(results) >= 2:
        first, last = results[rpcs[0]], results[rpcs[-1]]
        print(f"{rpcs[-1]} / {rpcs[0]}, calls per second:  " + "  ".join(
            f"{k} {last['per_s'][k] / first['per_s'][k]:.2f}" for k in OPS if k != "pingpong"))
    m = machine("master, daemon and this client as separate processes on one machine; "
                "NIXL UCX over loopback; one call in flight unless named")
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {m['setup']}")
    final = {**results[rpcs[-1]], "rpc": rpcs[-1], "machine": m, "calls_per_figure": calls,
             "auth": args.auth}
    if auth_ratio is not None:
        final["auth_off"] = by_mode[False][rpcs[-1]]
        final["auth_on_over_off"] = auth_ratio
        final["auth_ab_calls"] = ab
        final["auth_added_work"] = work
    for rpc in rpcs[:-1]:
        final[f"rpc_{rpc}"] = results[rpc]
    if args.json:
        Path(args.json).write_text(json.dumps(final, indent=2))


if __name__ == "__main__":
    main()
