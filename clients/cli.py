"""The ``kvpool`` command: start a pool, or look at one."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import sys
import urllib.error
import urllib.request
from typing import Any

from kvpool.config import PoolConfig, load
from kvpool.errors import KVPoolError


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


async def _until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _config(args: argparse.Namespace) -> PoolConfig:
    cfg = load(args.config)
    m, d = cfg.master, cfg.daemon
    if getattr(args, "port", None) is not None:
        m = dataclasses.replace(m, port=args.port)
    if getattr(args, "host", None):
        m = dataclasses.replace(m, host=args.host)
        d = dataclasses.replace(d, host=args.host)
    if getattr(args, "data_dir", None):
        d = dataclasses.replace(d, data_dir=args.data_dir)
    if getattr(args, "node_id", None):
        d = dataclasses.replace(d, node_id=args.node_id)
    if getattr(args, "master", None):
        d = dataclasses.replace(d, master_url=args.master)
    if getattr(args, "daemon_port", None) is not None:
        d = dataclasses.replace(d, port=args.daemon_port)
    if getattr(args, "etcd", None):
        m = dataclasses.replace(m, etcd=args.etcd)
        d = dataclasses.replace(d, etcd=args.etcd)
    if getattr(args, "cluster", None):
        m = dataclasses.replace(m, cluster=args.cluster)
        d = dataclasses.replace(d, cluster=args.cluster)
    return dataclasses.replace(cfg, master=m, daemon=d)


def _announce(what: dict[str, str]) -> None:
    print(json.dumps(what), flush=True)  # one line a script can parse


async def _up(args: argparse.Namespace) -> None:
    from kvpool.daemon import PoolDaemon
    from master.server import MasterServer

    cfg = _config(args)
    master = await MasterServer(cfg.master).start()
    daemon = await PoolDaemon(dataclasses.replace(cfg.daemon, master_url=master.url)).start()
    print(f"kvpool is up (single node, no etcd)\n"
          f"  master  {master.url}   (admin API: {master.url}/v1/cluster, {master.url}/openapi.json)\n"
          f"  daemon  {daemon.url}   node {cfg.daemon.node_id}, data in {cfg.daemon.data_dir}\n"
          f"  clients connect with master_url={master.url}\n"
          f"Press Ctrl-C to stop.", flush=True)
    _announce({"master": master.url, "daemon": daemon.url})
    try:
        await _until_signal()
    finally:
        print("stopping kvpool ...", flush=True)
        await daemon.stop()
        await master.stop()


async def _master(args: argparse.Namespace) -> None:
    from master.server import MasterServer

    cfg = _config(args)
    master = await MasterServer(cfg.master).start()
    mode = (f"cluster {cfg.master.cluster!r} through etcd {cfg.master.etcd} (standby until elected)"
            if cfg.master.etcd else "single master, no etcd")
    print(f"kvpool master at {master.url}, {mode}", flush=True)
    _announce({"master": master.url})
    try:
        await _until_signal()
    finally:
        await master.stop()


async def _daemon(args: argparse.Namespace) -> None:
    from kvpool.daemon import PoolDaemon

    cfg = _config(args)
    daemon = await PoolDaemon(cfg.daemon).start()
    joined = (f"cluster {cfg.daemon.cluster!r} through etcd {cfg.daemon.etcd}" if cfg.daemon.etcd
              else f"master {cfg.daemon.master_url}")
    print(f"kvpool daemon {cfg.daemon.node_id} at {daemon.url}, {joined}", flush=True)
    _announce({"daemon": daemon.url})
    try:
        await _until_signal()
    finally:
        await daemon.stop()


def _cluster_up(args: argparse.Namespace) -> int:
    """etcd, masters and daemons as processes of their own on free ports, until Ctrl-C."""
    import time
    from pathlib import Path

    from clients.launcher import LocalCluster

    root = Path(args.data_dir or "./data/cluster").resolve()
    shared = root / "objects"
    local = LocalCluster(root, cluster=args.cluster or "default", ttl_s=args.ttl,
                         etcd_members=args.etcd_members, daemon_env={
        "KVPOOL_DAEMON_HOST_BYTES": args.host_bytes, "KVPOOL_DAEMON_SSD_BYTES": args.ssd_bytes,
        "KVPOOL_DAEMON_OBJECT_URL": f"file://{shared}"})
    stop = False

    def interrupt(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, interrupt)
    try:
        print(f"starting etcd ({args.etcd_members} member(s)), {args.masters} master(s) and "
              f"{args.nodes} daemon(s) in {root} ...", flush=True)
        local.start_etcd()
        for i in range(args.masters):
            local.start_master(f"master{i}")
            print(f"  master{i} started", flush=True)
        leader = local.wait_leader()
        for i in range(args.nodes):
            local.start_daemon(f"node{i}")
            print(f"  node{i} joined", flush=True)
        local.wait_nodes(args.nodes)
        rows = [[p.role, p.name, p.url + ("  (leader)" if p is leader else ""), p.popen.pid, p.log]
                for p in local.procs.values()]
        print(f"\nkvpool cluster {local.cluster!r} is up\n{table(['role', 'name', 'url', 'pid', 'log'], rows)}\n"
              f"\n  clients:  ClientConfig(etcd=\"{local.etcd_endpoint}\", cluster=\"{local.cluster}\")"
              f"\n  status:   kvpool status --etcd {local.etcd_endpoint} --cluster {local.cluster}"
              f"\n  failover: kill -9 {leader.popen.pid}   (the leader; a standby takes over)"
              f"\n  shared object tier: {shared}\nPress Ctrl-C to stop.", flush=True)
        _announce({"etcd": local.etcd_endpoint, "cluster": local.cluster,
                   "masters": [p.url for p in local.masters()],
                   "daemons": {p.name: p.url for p in local.daemons()}})
        while not stop:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping the cluster ...", flush=True)
        local.stop()
    return 0


def _leader_url(etcd: str, cluster: str) -> str:
    """The leading master's URL, as etcd names it."""
    from kvpool.etcd_coordinator import EtcdCoordinator
    from kvpool.keyspace import Keyspace

    async def ask() -> bytes | None:
        coord = EtcdCoordinator(etcd, timeout_s=3.0)
        try:
            return await coord.get(Keyspace(cluster).leader)
        finally:
            await coord.close()

    raw = asyncio.run(ask())
    if raw is None:
        raise KVPoolError(f"cluster {cluster!r} has no leader in etcd {etcd} right now; "
                          "is a master running (kvpool master --etcd ...)?")
    return raw.decode()


def _status(args: argparse.Namespace) -> int:
    if args.etcd:
        url = _leader_url(args.etcd, args.cluster or "default")
    else:
        url = (args.master or load(args.config).client.master_url).rstrip("/")
    try:
        with urllib.request.urlopen(f"{url}/v1/nodes", timeout=5) as resp:
            nodes = json.load(resp)["nodes"]
        with urllib.request.urlopen(f"{url}/v1/cluster", timeout=5) as resp:
            summary = json.load(resp)
    except (urllib.error.URLError, OSError) as exc:
        print(f"cannot reach the master at {url}: {exc}\n"
              f"start one with `kvpool up`, or pass --master URL", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({"cluster": summary, "nodes": nodes}, indent=2))
        return 0
    rows = []
    for node in nodes:
        for t in node["tiers"]:
            pct = 100.0 * t["used"] / t["capacity"] if t["capacity"] else 0.0
            rows.append([node["node_id"], t["kind"], _human(t["capacity"]), _human(t["used"]),
                         f"{pct:.1f}%", t["blocks"]])
    print(f"master {url}: {summary['nodes']} node(s), {summary['blocks']} blocks, "
          f"{summary['pending']} puts in flight")
    print(table(["node", "tier", "capacity", "used", "use", "blocks"], rows))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvpool", description="a tiered KV-cache block pool")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help="TOML config file (see configs/)")

    up = sub.add_parser("up", help="master and daemon in one process, no etcd")
    common(up)
    up.add_argument("--host", help="address to bind (default 127.0.0.1)")
    up.add_argument("--port", type=int, help="master port (default from config; 0 = free)")
    up.add_argument("--daemon-port", type=int, help="daemon port (default: a free one)")
    up.add_argument("--data-dir", help="folder for the SSD and object tiers")
    up.add_argument("--node-id", help="this node's id")
    m = sub.add_parser("master", help="run a master")
    common(m)
    m.add_argument("--host")
    m.add_argument("--port", type=int)
    m.add_argument("--etcd", help="etcd endpoint host:port: run as one of a cluster's masters")
    m.add_argument("--cluster", help="cluster name (default 'default')")
    d = sub.add_parser("daemon", help="run a pool daemon")
    common(d)
    d.add_argument("--master", help="master URL, e.g. http://127.0.0.1:7700")
    d.add_argument("--host")
    d.add_argument("--daemon-port", "--port", dest="daemon_port", type=int)
    d.add_argument("--data-dir")
    d.add_argument("--node-id")
    d.add_argument("--etcd", help="etcd endpoint host:port: join a cluster (instead of --master)")
    d.add_argument("--cluster", help="cluster name (default 'default')")
    s = sub.add_parser("status", help="a table of the pool's tiers")
    common(s)
    s.add_argument("--master", help="master URL (default: [client] master_url)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--etcd", help="etcd endpoint host:port: ask the cluster's leader")
    s.add_argument("--cluster", help="cluster name (default 'default')")
    c = sub.add_parser("cluster", help="a cluster on this machine: etcd, masters and daemons")
    csub = c.add_subparsers(dest="action", required=True)
    cu = csub.add_parser("up", help="start etcd, masters and N daemons on free ports")
    cu.add_argument("nodes", type=int, nargs="?", default=3, help="number of daemons (default 3)")
    cu.add_argument("--masters", type=int, default=2, help="number of masters (default 2)")
    cu.add_argument("--etcd-members", type=int, default=1,
                    help="members of the etcd cluster (default 1; 3 survive losing one)")
    cu.add_argument("--data-dir", help="folder for every process's data and log (default ./data/cluster)")
    cu.add_argument("--cluster", help="cluster name (default 'default')")
    cu.add_argument("--ttl", type=float, default=3.0, help="leader and membership lease, seconds")
    cu.add_argument("--host-bytes", default="256MiB", help="host arena of each daemon")
    cu.add_argument("--ssd-bytes", default="1GiB", help="SSD tier of each daemon")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "status":
            return _status(args)
        if args.command == "cluster":
            return _cluster_up(args)
        runner = {"up": _up, "master": _master, "daemon": _daemon}[args.command]
        asyncio.run(runner(args))
        return 0
    except KVPoolError as exc:
        print(f"kvpool {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
