"""The ``kvpool`` verbs that start masters: ``up`` (master and daemon in one process),
``master``, and ``cluster up`` (etcd, masters and daemons as processes). They live here,
with the server they start, and register with the core's command as entry points."""

from __future__ import annotations

import argparse
import dataclasses
import signal
import time
from pathlib import Path

from kvpool.cli import Verb, announce, config, config_argument, serving, table, until_signal


def _up_arguments(up: argparse.ArgumentParser) -> None:
    config_argument(up)
    up.add_argument("--host", help="address to bind (default 127.0.0.1)")
    up.add_argument("--port", type=int, help="master port (default from config; 0 = free)")
    up.add_argument("--daemon-port", type=int, help="daemon port (default: a free one)")
    up.add_argument("--data-dir", help="folder for the SSD and object tiers")
    up.add_argument("--node-id", help="this node's id")


async def _up(args: argparse.Namespace) -> None:
    from kvpool.daemon import PoolDaemon
    from master.server import MasterServer

    cfg = config(args)
    master = await MasterServer(cfg.master).start()
    # One process, one cluster credential: the daemon takes the master's unless given its own.
    daemon = await PoolDaemon(dataclasses.replace(
        cfg.daemon, master_url=master.url,
        cluster_token=cfg.daemon.cluster_token or cfg.master.cluster_token,
        tls_ca=cfg.daemon.tls_ca or cfg.master.tls_ca)).start()
    print(f"kvpool is up (single node, no etcd)\n"
          f"  master  {master.url}   (admin API: {master.url}/v1/cluster, {master.url}/openapi.json)\n"
          f"  daemon  {daemon.url}   node {cfg.daemon.node_id}, data in {cfg.daemon.data_dir}\n"
          f"  clients connect with master_url={master.url}\n"
          f"Press Ctrl-C to stop.", flush=True)
    announce({"master": master.url, "daemon": daemon.url})
    try:
        await until_signal()
    finally:
        print("stopping kvpool ...", flush=True)
        await daemon.stop()
        await master.stop()


def _master_arguments(m: argparse.ArgumentParser) -> None:
    config_argument(m)
    m.add_argument("--host")
    m.add_argument("--port", type=int)
    m.add_argument("--etcd", help="etcd endpoint host:port: run as one of a cluster's masters")
    m.add_argument("--cluster", help="cluster name (default 'default')")


async def _master(args: argparse.Namespace) -> None:
    from master.server import MasterServer

    cfg = config(args)
    master = await MasterServer(cfg.master).start()
    mode = (f"cluster {cfg.master.cluster!r} through etcd {cfg.master.etcd} (standby until elected)"
            if cfg.master.etcd else "single master, no etcd")
    print(f"kvpool master at {master.url}, {mode}", flush=True)
    announce({"master": master.url})
    try:
        await until_signal()
    finally:
        await master.stop()


def _cluster_arguments(c: argparse.ArgumentParser) -> None:
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
    cu.add_argument("--open", action="store_true",
                    help="run without credentials (default: generate one per role)")


def _cluster_up(args: argparse.Namespace) -> int:
    """etcd, masters and daemons as processes of their own on free ports, until Ctrl-C."""
    from kvpool.launcher import LocalCluster

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
    # Ctrl-C stops it even when it was started with SIGINT ignored, as a script's
    # background job is (and everything such a job starts inherits that).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    creds = {} if args.open else local.generate_credentials()
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
        client_line = f"etcd=\"{local.etcd_endpoint}\", cluster=\"{local.cluster}\""
        status_line = f"kvpool status --etcd {local.etcd_endpoint} --cluster {local.cluster}"
        if creds:
            client_line += f", token=\"{creds['client']}\""
            status_line += f" --token {creds['viewer']}"
        secured = (f"credentials: one file per role (mode 0600) in {root / 'credentials'}"
                   if creds else "credentials: none (--open): whoever reaches it may use it")
        print(f"\nkvpool cluster {local.cluster!r} is up\n{table(['role', 'name', 'url', 'pid', 'log'], rows)}\n"
              f"\n  clients:  ClientConfig({client_line})"
              f"\n  status:   {status_line}"
              f"\n  {secured}"
              f"\n  failover: kill -9 {leader.popen.pid}   (the leader; a standby takes over)"
              f"\n  shared object tier: {shared}\nPress Ctrl-C to stop.", flush=True)
        announce({"etcd": local.etcd_endpoint, "cluster": local.cluster,
                  "masters": [p.url for p in local.masters()],
                  "daemons": {p.name: p.url for p in local.daemons()}, "credentials": creds})
        while not stop:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        print("stopping the cluster ...", flush=True)
        local.stop()
    return 0


UP = Verb("up", "master and daemon in one process, no etcd", _up_arguments, serving(_up))
MASTER = Verb("master", "run a master", _master_arguments, serving(_master))
CLUSTER = Verb("cluster", "a cluster on this machine: etcd, masters and daemons",
               _cluster_arguments, _cluster_up)
