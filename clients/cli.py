"""The ``kvpool`` verbs that look at a pool (``status``); they register with the core's
command as entry points, beside the verbs that start servers (master/cli.py)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import urllib.error
import urllib.request

from kvpool.auth import bearer, secret
from kvpool.cli import Verb, config_argument, human, table
from kvpool.config import load
from kvpool.errors import KVPoolError


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
    headers = bearer(secret(args.token or load(args.config).client.token, "--token"))

    def fetch(path: str) -> dict:
        with urllib.request.urlopen(urllib.request.Request(url + path, headers=headers),
                                    timeout=5) as resp:
            return json.load(resp)

    try:
        nodes, summary = fetch("/v1/nodes")["nodes"], fetch("/v1/cluster")
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            print(f"the master at {url} refused: {json.loads(exc.read() or b'{}').get('message')}\n"
                  "pass --token (a viewer or admin credential, or file:PATH)", file=sys.stderr)
            return 2
        print(f"the master at {url} answered {exc.code}: {exc.reason}", file=sys.stderr)
        return 2
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
            rows.append([node["node_id"], t["kind"], human(t["capacity"]), human(t["used"]),
                         f"{pct:.1f}%", f"{100 * t['low_watermark']:.0f}-{100 * t['high_watermark']:.0f}%",
                         t["blocks"], f"{t['compression']:.2f}x", node.get("state", "-")])
    print(f"master {url}: {summary['nodes']} node(s), {summary['blocks']} blocks, "
          f"{summary['pending']} puts in flight")
    for node in nodes:
        if node.get("state", "active") != "active":
            print(f"node {node['node_id']} is {node['state']}: moved {node['moved']}, "
                  f"{node['left']} blocks left" + (f" ({node['note']})" if node.get("note") else ""))
    print(table(["node", "tier", "capacity", "used", "use", "watermarks", "blocks", "compression",
                 "state"], rows))
    return 0


def _status_arguments(s: argparse.ArgumentParser) -> None:
    config_argument(s)
    s.add_argument("--master", help="master URL (default: [client] master_url)")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--etcd", help="etcd endpoint host:port: ask the cluster's leader")
    s.add_argument("--cluster", help="cluster name (default 'default')")
    s.add_argument("--token", help="viewer (or admin) credential, or file:PATH; default: "
                                   "[client] token or KVPOOL_CLIENT_TOKEN")


STATUS = Verb("status", "a table of the pool's tiers", _status_arguments, _status)
