"""The master at fleet scale: one master's index grown from 10 k blocks to 1 M (10 M
without --quick), and at each size what it costs.

Real processes on this machine (kvpool.launcher.LocalCluster): an etcd server, two
masters in cluster mode (a leader and a standby), and one simulated daemon. The daemon is
real on the wire (it speaks the daemon link, kvpool.daemon_link, over the stream RPC and
keeps its membership key in etcd) but holds no arena: it records the blocks the master
adopts and serves their inventory in pages, so ten million 4 KiB blocks need no 40 GB of
memory. Puts therefore reserve and commit through the master as a client does, without
writing bytes in between: the master never reads a block's bytes (a commit carries the
header, checksum included; only readers verify), so what is measured is all the master's.

At each size:
- rss_bytes_per_block: the leader's VmRSS (/proc/<pid>/status) minus its RSS when empty,
  over the blocks it holds;
- put_blocks_per_s: blocks committed per second while growing to this size, in puts of
  1000 chained 4 KiB blocks (reserve + commit), PUTS_IN_FLIGHT puts at once;
- match1000_p50/p99_ms: match_prefix over the 1000 keys of one stored put;
- exists_p50/p99_ms: exists of one stored key, one call in flight;
- rebuild_s: the leader is SIGKILLed; from the moment the standby is elected to the
  moment it is ready (every inventory page taken in); failover_s adds the election
  (the leader's lease, 3 s here). Then the standby's exists must answer true for a
  sample of keys, and the killed master comes back as the next standby.

Prints a table; ``--json PATH`` writes {"sizes": {"<blocks>": {...}}, "machine": ...};
``--quick`` stops at 1 M (a few minutes here); the full run needs two masters holding
10 M blocks each, some 25 GB on this 24 GB machine. ``--max N`` stops at N. Any
unexpected error fails the run.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import random
import signal
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from aiohttp import web

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from benchlib import machine  # noqa: E402
from kvpool.auth import Credentials  # noqa: E402
from kvpool.tasks import run as run_loop  # noqa: E402
from kvpool.codec import make_header  # noqa: E402
from kvpool.daemon_link import (DAEMON_EAGER, DAEMON_ROLES, DAEMON_RPC_PATH, ArenaRegion,  # noqa: E402
                                CopyResult, Fence, Health, InventoryPage, InventoryRequest,
                                InventorySnapshots, PinMark, Registration, RegionMetadata, take_marks,
                                SendItem, SendTarget, StoredBlock, TierDescription,
                                daemon_endpoint)
from kvpool.errors import (KVPoolError, NotLeader, NotReady, ReservationLost, TierFull,  # noqa: E402
                           Unavailable)
from kvpool.keys import BlockKey  # noqa: E402
from kvpool.launcher import LocalCluster, spawn  # noqa: E402
from kvpool.protocol import Call, CommitRequest, ReserveRequest, ReserveStatus  # noqa: E402
from kvpool.streamrpc import StreamRpcClient, StreamRpcServer  # noqa: E402
from kvpool.tiers.base import TierKind  # noqa: E402
from kvpool.wire import MAX_BODY  # noqa: E402

BLOCK = 4096
PUT = 1000  # blocks per put
PUTS_IN_FLIGHT = 4
SIZES = [10_000, 100_000, 300_000, 1_000_000, 10_000_000]
QUICK_TOP = 1_000_000
ARENA_BASE = 1 << 40


# -- the simulated daemon (a process of its own: `--sim-daemon`) --------------------------

class SimDaemon:
    """The daemon link's service without bytes: adopted blocks are records, copies and
    sends are refused (the master is configured never to ask for them)."""

    def __init__(self, node_id: str, capacity: int) -> None:
        self.node_id, self.capacity = node_id, capacity
        self.agent = f"sim-{node_id}-{os.getpid()}"
        self.url = ""
        self.held: dict[BlockKey, StoredBlock] = {}
        self.marks: dict[BlockKey, PinMark] = {}
        self.pages = InventorySnapshots(lambda: list(self.held.values()), list, lambda: self.marks)

    async def adopt(self, blocks: Sequence[StoredBlock]) -> None:
        for b in blocks:
            self.held[b.key] = b

    async def copy(self, keys: Sequence[BlockKey], src: TierKind, dst: TierKind,
                   locations: Sequence[int]) -> list[CopyResult]:
        return [CopyResult(error=TierFull("a simulated daemon has one tier")) for _ in keys]

    async def send(self, target: SendTarget, items: Sequence[SendItem]) -> list[CopyResult]:
        return [CopyResult(error=TierFull("a simulated daemon sends nothing")) for _ in items]

    async def drop(self, tier: TierKind, keys: Sequence[BlockKey]) -> int:
        return sum(self.held.pop(k, None) is not None for k in keys)

    async def inventory(self, req: InventoryRequest) -> InventoryPage:
        return self.pages.page(req)

    async def mark(self, marks: Sequence[PinMark]) -> None:
        take_marks(self.marks, marks)

    async def registration(self, rescan: bool = False) -> Registration:
        return Registration(self.node_id, self.url, self.agent, b"", 5.0,
                            [TierDescription(TierKind.HOST, self.capacity, ARENA_BASE)])

    async def health(self) -> Health:
        return Health(self.node_id, self.agent, {"host": [self.capacity, 0, len(self.held)]})

    async def regions(self, regions: Sequence[ArenaRegion]) -> RegionMetadata:
        return RegionMetadata(b"", [b"" for _ in regions])


async def serve_sim_daemon(args: argparse.Namespace) -> None:
    from kvpool.etcd_coordinator import EtcdCoordinator
    from kvpool.membership import Membership

    sim = SimDaemon(args.node_id, args.capacity)
    stream = StreamRpcServer(daemon_endpoint(sim, Fence()), Credentials(), DAEMON_ROLES, None,
                             eager=DAEMON_EAGER, max_frame=MAX_BODY)
    await stream.start("127.0.0.1", 0)
    app = web.Application()
    app.router.add_get(DAEMON_RPC_PATH + "/stream", stream.info())
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    sim.url = f"http://127.0.0.1:{port}"
    coord = EtcdCoordinator(args.etcd, timeout_s=2.0)
    members = Membership(coord, args.cluster, args.node_id, 5.0,
                         lambda: {"url": sim.url, "agent": sim.agent, "ttl_s": 5.0,
                                  "tiers": {"host": sim.capacity}})
    await members.join()
    members.start()
    print(json.dumps({"daemon": sim.url}), flush=True)
    await asyncio.Event().wait()  # until killed


# -- the benchmark ------------------------------------------------------------------------

def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def readyz(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return json.loads(err.read() or b"{}")
    except (OSError, ValueError):
        return {}


def put_keys(put: int) -> list[BlockKey]:
    return [(put * PUT + i).to_bytes(8, "little") + b"bench-sc" for i in range(PUT)]


class Bench:
    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.header = make_header(np.zeros(BLOCK, np.uint8), "uint8")
        self.puts = 0  # puts stored so far; put i holds put_keys(i)
        self.empty_rss: dict[str, int] = {}
        self.rpc: StreamRpcClient | None = None
        self.retries = 0  # calls asked again of a leader in doubt (reported)
        self.redone = 0  # puts put again after a step-down took their reservation (reported)

    async def link(self) -> StreamRpcClient:
        """The link to the leader, found once (and again after ``lost``)."""
        if self.rpc is None:
            leader = await asyncio.to_thread(self.cluster.wait_leader, 60)
            self.rpc = StreamRpcClient(leader.url, timeout_s=60.0)
        return self.rpc

    async def lost(self) -> None:
        if self.rpc is not None:
            rpc, self.rpc = self.rpc, None
            await rpc.close()

    async def call(self, name: Call, body: dict[str, Any]) -> Any:
        """A call on the leader; a leader in doubt of its lease (a loaded machine delays
        etcd) or one just elected is asked again, as clients do, for up to 60 s."""
        deadline = time.monotonic() + 60
        while True:
            try:
                return await (await self.link()).call(name, body)
            except (NotLeader, NotReady, Unavailable) as exc:
                self.retries += 1
                if not isinstance(exc, NotReady):
                    await self.lost()
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.1)

    async def one_put(self, put: int) -> None:
        """Put ``put``'s blocks; a put whose reservation a step-down took (a loaded machine
        delays etcd past the leader's deadline) is put again, as a client would."""
        keys = put_keys(put)
        parents: list[BlockKey | None] = [None, *keys[:-1]]
        while True:
            res = await self.call(Call.RESERVE, ReserveRequest(keys, [BLOCK] * PUT, parents).pack())
            statuses = [ReserveStatus(item[0]) for item in res["items"]]
            if ReserveStatus.IN_FLIGHT in statuses:
                raise RuntimeError(f"put {put}: keys in flight that no other writer puts")
            new = [k for k, st in zip(keys, statuses) if st is ReserveStatus.NEW]
            # each header names its parent, as a client's does (kvpool.codec)
            headers = [dataclasses.replace(self.header, parent=p).encode()
                       for p, st in zip(parents, statuses) if st is ReserveStatus.NEW]
            if len(new) < PUT and not self.redone:
                raise RuntimeError(f"put {put}: {PUT - len(new)} keys stored before they were put")
            try:
                done = await self.call(Call.COMMIT, CommitRequest(res["put_id"], new, headers).pack())
            except ReservationLost:
                self.redone += 1
                continue
            if done["committed"] != len(new):
                raise RuntimeError(f"put {put}: {done['committed']} of {len(new)} committed")
            return

    async def grow(self, target: int) -> float:
        """Puts until ``target`` blocks are stored; returns blocks committed per second."""
        first, last = self.puts, target // PUT
        todo = iter(range(first, last))
        start = time.perf_counter()
        report = [start]

        async def writer() -> None:
            for put in todo:
                await self.one_put(put)
                self.puts = max(self.puts, put + 1)
                now = time.perf_counter()
                if now - report[0] > 10:
                    report[0] = now
                    done = put + 1 - first
                    print(f"  ... {put + 1} puts stored, {done * PUT / (now - start):,.0f} blocks/s",
                          flush=True)

        await asyncio.gather(*(writer() for _ in range(PUTS_IN_FLIGHT)))
        self.puts = last
        return (last - first) * PUT / (time.perf_counter() - start)

    async def latencies(self) -> dict[str, float]:
        rng = random.Random(1)
        match_ms, exists_ms = [], []
        for _ in range(200):
            keys = put_keys(rng.randrange(self.puts))
            t = time.perf_counter()
            res = await self.call(Call.MATCH, {"keys": keys})
            match_ms.append((time.perf_counter() - t) * 1e3)
            if res["count"] != PUT:
                raise RuntimeError(f"match_prefix found {res['count']} of {PUT} stored keys")
        for _ in range(2000):
            put = rng.randrange(self.puts)
            key = put_keys(put)[rng.randrange(PUT)]
            t = time.perf_counter()
            res = await self.call(Call.EXISTS, {"keys": [key]})
            exists_ms.append((time.perf_counter() - t) * 1e3)
            if res["present"] != [True]:
                raise RuntimeError("exists of a stored key answered false")
        q = lambda xs, p: float(np.percentile(xs, p))  # noqa: E731
        return {"match1000_p50_ms": q(match_ms, 50), "match1000_p99_ms": q(match_ms, 99),
                "exists_p50_ms": q(exists_ms, 50), "exists_p99_ms": q(exists_ms, 99)}

    async def rebuild(self) -> dict[str, float]:
        """Kill the leader; time the standby's election and rebuild; check it holds the keys."""
        c = self.cluster
        old = c.wait_leader(60)
        standby = next(p for p in c.masters() if p.name != old.name and p.alive())
        await self.lost()
        killed = time.perf_counter()
        c.kill(old.name, signal.SIGKILL)
        elected = None
        deadline = killed + 600
        while True:
            state = await asyncio.to_thread(readyz, standby.url)
            now = time.perf_counter()
            if elected is None and state.get("leader"):
                elected = now
            if state.get("ready"):
                break
            if now > deadline:
                raise RuntimeError(f"the standby {standby.name} was not ready 600 s after the kill")
            await asyncio.sleep(0.01)
        ready = time.perf_counter()
        elected = elected if elected is not None else ready
        rng = random.Random(2)
        sample = [put_keys(p)[rng.randrange(PUT)] for p in
                  (rng.randrange(self.puts) for _ in range(min(self.puts, 1000)))]
        sample += put_keys(self.puts - 1)
        present = (await self.call(Call.EXISTS, {"keys": sample}))["present"]
        if not all(present):
            raise RuntimeError(f"after the rebuild {present.count(False)} of {len(sample)} "
                               "stored keys are missing")
        status = json.loads(urllib.request.urlopen(standby.url + "/v1/cluster", timeout=10).read())
        await asyncio.to_thread(self.start_master, old.name)
        return {"rebuild_s": ready - elected, "failover_s": ready - killed,
                "rebuilt_blocks": status.get("blocks", -1)}

    def start_master(self, name: str) -> None:
        proc = self.cluster.start_master(name)
        time.sleep(1.0)
        self.empty_rss[name] = rss(proc.popen.pid)

    async def close(self) -> None:
        if self.rpc is not None:
            await self.rpc.close()


async def run(args: argparse.Namespace, sizes: list[int]) -> dict[str, Any]:
    capacity = int(sizes[-1] * BLOCK * 1.2)  # never near a watermark: nothing is demoted
    root = Path(tempfile.mkdtemp(prefix="bench-scale-"))
    cluster = LocalCluster(root, cluster="scale", ttl_s=3.0, master_env={
        "KVPOOL_MASTER_HOST_HIGH": "1.0", "KVPOOL_MASTER_HOST_LOW": "1.0",
        "KVPOOL_MASTER_PUT_TIMEOUT_S": "60", "KVPOOL_MASTER_MAX_PUTS": "65536",
        "KVPOOL_MASTER_CLIENT_MAX_PUTS": "65536"})
    bench = Bench(cluster)
    sim = None
    out: dict[str, Any] = {}
    try:
        cluster.start_etcd()
        for name in ("m0", "m1"):
            bench.start_master(name)
        cluster.wait_leader(60)
        env = {"PYTHONPATH": f"{ROOT / 'scripts'}:{ROOT}"}
        sim, info = spawn("bench_scale", ["--sim-daemon", "--etcd", cluster.etcd_endpoint,
                                          "--cluster", "scale", "--node-id", "sim0",
                                          "--capacity", str(capacity)], env, root / "sim0.log")
        cluster.wait_nodes({"sim0"})
        for name, proc in cluster.procs.items():  # the leader with a node and no block yet
            if proc.role == "master":
                bench.empty_rss[name] = rss(proc.popen.pid)
        print(f"empty masters' RSS: {', '.join(f'{n} {v / 2**20:.0f} MiB' for n, v in bench.empty_rss.items())}",
              flush=True)
        for size in sizes:
            print(f"growing to {size:,} blocks ...", flush=True)
            put_rate = await bench.grow(size)
            leader = cluster.wait_leader(60)
            held = rss(leader.popen.pid)
            row: dict[str, Any] = {
                "rss_bytes_per_block": (held - bench.empty_rss[leader.name]) / size,
                "rss_mib": held / 2**20, "put_blocks_per_s": put_rate}
            row.update(await bench.latencies())
            print(f"  {size:,}: {row['rss_bytes_per_block']:.0f} B/block, {put_rate:,.0f} puts/s, "
                  f"match1000 p50 {row['match1000_p50_ms']:.2f} ms; rebuilding ...", flush=True)
            row.update(await bench.rebuild())
            if row["rebuilt_blocks"] != size:
                raise RuntimeError(f"the new leader holds {row['rebuilt_blocks']} blocks, not {size}")
            print(f"  rebuilt in {row['rebuild_s']:.2f} s (failover {row['failover_s']:.2f} s)",
                  flush=True)
            row["retries"], row["puts_redone"] = bench.retries, bench.redone
            out[str(size)] = row
    except BaseException:
        print(f"logs in {root}", file=sys.stderr)
        raise
    finally:
        await bench.close()
        if sim is not None:
            sim.kill()
            sim.wait()
        cluster.stop()
    return out


def table(sizes: dict[str, Any]) -> str:
    head = (f"{'blocks':>10} {'B/block':>8} {'RSS MiB':>8} {'puts/s':>9} {'match p50':>9} "
            f"{'match p99':>9} {'exists p50':>10} {'exists p99':>10} {'rebuild s':>9} {'failover s':>10}")
    lines = [head, "-" * len(head)]
    for n, r in sizes.items():
        lines.append(f"{int(n):>10,} {r['rss_bytes_per_block']:>8.0f} {r['rss_mib']:>8.0f} "
                     f"{r['put_blocks_per_s']:>9,.0f} {r['match1000_p50_ms']:>9.2f} "
                     f"{r['match1000_p99_ms']:>9.2f} {r['exists_p50_ms']:>10.3f} "
                     f"{r['exists_p99_ms']:>10.3f} {r['rebuild_s']:>9.2f} {r['failover_s']:>10.2f}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="stop at 1 M blocks")
    ap.add_argument("--max", type=int, default=0, help="the largest size to grow to")
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--sim-daemon", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--etcd", help=argparse.SUPPRESS)
    ap.add_argument("--cluster", help=argparse.SUPPRESS)
    ap.add_argument("--node-id", help=argparse.SUPPRESS)
    ap.add_argument("--capacity", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sim_daemon:
        run_loop(serve_sim_daemon(args))
        return
    top = args.max or (QUICK_TOP if args.quick else SIZES[-1])
    sizes = [s for s in SIZES if s < top] + [top]
    setup = (f"etcd + 2 masters (cluster mode) + 1 simulated daemon (no arena, real daemon "
             f"link); puts of {PUT} x {BLOCK} B blocks, {PUTS_IN_FLIGHT} in flight, bytes not "
             "written (the master never reads them)")
    info = machine(setup)
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['memory_gib']} GiB; {setup}", flush=True)
    try:
        sizes_out = run_loop(run(args, sizes))
    except (KVPoolError, RuntimeError, OSError) as exc:
        print(f"bench_scale FAILED: {type(exc).__name__}: {exc}", file=sys.stderr)
        raise SystemExit(1)
    print(table(sizes_out))
    if args.json:
        Path(args.json).write_text(json.dumps({"sizes": sizes_out, "machine": info}, indent=2))


if __name__ == "__main__":
    main()
