"""The ``kvpool`` verbs an operator uses on a running pool: ``events`` (follow the KV
event stream), ``purge`` (a namespace, a model or everything), ``top`` (a live view),
``drain`` (move a node's blocks off it before stopping it) and ``block`` (one block's
replicas).

Each finds the master in ``--master``, else ``KVPOOL_MASTER``, else the config's
``[client] master_url``; the credential in ``--token``, else ``KVPOOL_TOKEN``, else
``[client] token``; and says what to do next when the master cannot be used.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime
from typing import Any

from kvpool.auth import bearer, secret
from kvpool.cli import Verb, config_argument, human, table
from kvpool.config import load
from kvpool.errors import KVPoolError
from kvpool.keys import Namespace

READ_TIMEOUT_S = 40.0  # the master sends a keepalive every 15 s; silence past this is a dead link
RECONNECT_S = (0.5, 1.0, 2.0, 5.0)


def _common(p: argparse.ArgumentParser) -> None:
    config_argument(p)
    p.add_argument("--master", help="master URL (default: KVPOOL_MASTER, else [client] master_url)")
    p.add_argument("--token", help="credential, or file:PATH (default: KVPOOL_TOKEN, else "
                                   "[client] token)")


def _master(args: argparse.Namespace) -> str:
    url = args.master or os.environ.get("KVPOOL_MASTER") or load(args.config).client.master_url
    return url.split(",")[0].rstrip("/")


def _headers(args: argparse.Namespace) -> dict[str, str]:
    raw = args.token or os.environ.get("KVPOOL_TOKEN") or load(args.config).client.token
    return bearer(secret(raw, "--token"))


class Refused(Exception):
    """The master could not be used; the message says what to do."""


def _call(url: str, path: str, headers: dict[str, str], body: dict[str, Any] | None = None,
          method: str = "GET") -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method=method,
                                 headers={**headers, "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        message = (json.loads(exc.read() or b"{}") or {}).get("message", exc.reason)
        hint = {401: "pass --token (or set KVPOOL_TOKEN)",
                403: "this needs another role's credential (purge, drain: the admin one)",
                404: "check the name (`kvpool status` lists the nodes; `kvpool events` "
                     "prints block keys)"}.get(exc.code, "")
        raise Refused(f"the master at {url} answered {exc.code}: {message}"
                      + (f"\n{hint}" if hint else "")) from None
    except (urllib.error.URLError, OSError) as exc:
        raise Refused(f"cannot reach the master at {url}: {exc}\nstart one with `kvpool up`, "
                      "or pass --master URL (or set KVPOOL_MASTER)") from None


def _guarded(run: Any) -> Any:
    def verb(args: argparse.Namespace) -> int:
        try:
            return run(args)
        except Refused as exc:
            print(f"kvpool {args.command}: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
    return verb


# -- events --------------------------------------------------------------------------------

def _line(event: dict[str, Any]) -> str:
    when = datetime.fromtimestamp(event.get("ts", 0)).strftime("%H:%M:%S.%f")[:-3]
    kind = event.get("type", "?")
    if kind == "EventsLost":
        missed = event.get("missed")
        how_many = "an unknown number of" if missed is None else str(missed)
        return (f"{event.get('id')}  {when}  EventsLost  missed {how_many} events; "
                f"resuming at {event.get('resume_from')}")
    keys = event.get("block_hashes") or []
    shown = " ".join(keys[:4]) + (f" (+{len(keys) - 4})" if len(keys) > 4 else "")
    return "  ".join(str(x) for x in (event.get("id"), when, kind, event.get("medium") or "-",
                                      event.get("node") or "-", event.get("reason") or "-", shown))


async def follow(url: str, headers: dict[str, str], last: str | None, count: int | None,
                 as_json: bool, out: Any = sys.stdout) -> int:
    """Print events until ``count`` arrived (None: until interrupted), reconnecting from
    the last id seen whenever an established stream drops."""
    import aiohttp

    seen, failures = 0, 0
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=READ_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while count is None or seen < count:
            hdrs = dict(headers)
            if last is not None:
                hdrs["Last-Event-ID"] = last
            try:
                async with session.get(url + "/v1/events", headers=hdrs) as resp:
                    if resp.status != 200:
                        body = await resp.text()
                        try:
                            body = json.loads(body).get("message", body)
                        except ValueError:
                            pass
                        raise Refused(f"the master at {url} answered {resp.status}: {body}"
                                      + ("\npass --token (a viewer credential)"
                                         if resp.status in (401, 403) else ""))
                    failures = 0
                    data: list[str] = []
                    async for raw in resp.content:
                        line = raw.decode().rstrip("\r\n")
                        if line.startswith("id:"):
                            last = line[3:].strip()
                        elif line.startswith("data:"):
                            data.append(line[5:].strip())
                        elif not line and data:
                            text, data = "\n".join(data), []
                            print(text if as_json else _line(json.loads(text)), file=out, flush=True)
                            seen += 1
                            if count is not None and seen >= count:
                                return 0
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                if last is None and failures == 0 and seen == 0:  # never reached it
                    raise Refused(f"cannot reach the master at {url}: {exc}\nstart one with "
                                  "`kvpool up`, or pass --master URL (or set KVPOOL_MASTER)") from None
                wait = RECONNECT_S[min(failures, len(RECONNECT_S) - 1)]
                failures += 1
                print(f"# lost the stream ({type(exc).__name__}); reconnecting from id {last} "
                      f"in {wait:.1f}s", file=sys.stderr, flush=True)
                await asyncio.sleep(wait)
    return 0


def _events(args: argparse.Namespace) -> int:
    return asyncio.run(follow(_master(args), _headers(args), args.last_event_id, args.count,
                              args.json))


def _events_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--last-event-id", "--from", dest="last_event_id",
                   help="resume after this event id (0: everything the master still holds)")
    p.add_argument("--count", type=int, help="stop after this many events")
    p.add_argument("--json", action="store_true", help="print each event's JSON")


# -- purge ---------------------------------------------------------------------------------

def _purge(args: argparse.Namespace) -> int:
    body: dict[str, Any]
    if args.all:
        if not args.yes:
            print("kvpool purge --all removes every block of the pool; add --yes to do it",
                  file=sys.stderr)
            return 2
        body = {"all": True}
    elif args.model or args.namespace:
        roots = []
        for ns in args.namespace or []:
            roots.append(ns if len(ns) == 32 else _root(ns))
        body = {"models": args.model or [], "namespaces": roots}
    else:
        print("kvpool purge: name --model ID, --namespace ROOT (or model:dtype:layout[:tp_rank:"
              "tp_world:block_tokens:salt]), or --all --yes", file=sys.stderr)
        return 2
    res = _call(_master(args), "/v1/purge", _headers(args), body, "POST")
    print(json.dumps(res) if args.json else f"purged {res['purged']} blocks")
    return 0


def _root(spec: str) -> str:
    """A namespace root from ``model:dtype:layout[:tp_rank:tp_world:block_tokens:salt]``."""
    parts = spec.split(":")
    if len(parts) < 3:
        raise Refused(f"--namespace {spec!r}: give the 32-hex root or model:dtype:layout[:...]")
    try:
        ns = Namespace(parts[0], parts[1], parts[2],
                       *(int(p) for p in parts[3:6]), *parts[6:7])  # type: ignore[arg-type]
    except (ValueError, TypeError, KVPoolError) as exc:
        raise Refused(f"--namespace {spec!r}: {exc}") from None
    return ns.root().hex()


def _purge_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--model", action="append", help="purge every block written for this model id")
    p.add_argument("--namespace", action="append", help="purge a namespace: its 32-hex root, or "
                   "model:dtype:layout[:tp_rank:tp_world:block_tokens:salt]")
    p.add_argument("--all", action="store_true", help="purge every block (with --yes)")
    p.add_argument("--yes", action="store_true", help="confirm --all")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")


# -- top -----------------------------------------------------------------------------------

def _top_once(url: str, headers: dict[str, str], prev: dict[str, Any] | None
              ) -> tuple[str, dict[str, Any]]:
    cluster = _call(url, "/v1/cluster", headers)
    stats = _call(url, "/v1/stats?recent=8", headers)
    c = stats["counters"]
    looked = c["match_hits"] + c["match_misses"]
    hit = f"{100 * c['match_hits'] / looked:.1f}%" if looked else "-"
    lines = [f"kvpool top  {url}  {stats['role']}  {cluster['nodes']} node(s)  "
             f"{cluster['blocks']} blocks  {cluster['pending']} puts in flight  "
             f"prefix hit rate {hit}"]
    if prev is not None:
        dt = max(1e-3, stats["ts"] - prev["ts"])
        p = prev["counters"]

        def rate(*names: str) -> str:
            return f"{sum(c[n] - p[n] for n in names) / dt:.1f}"

        lines.append(f"puts/s {rate('committed')}  gets/s {rate('get_hits', 'get_misses')}  "
                     f"matches/s {rate('match_hits', 'match_misses')}  evictions/s {rate('evicted')}")
    rows = [[kind, human(t["capacity"]), human(t["used"]),
             f"{100 * t['used'] / t['capacity']:.1f}%" if t["capacity"] else "-", t["blocks"]]
            for kind, t in cluster["tiers"].items()]
    lines += ["", table(["tier", "capacity", "used", "use", "blocks"], rows), "", "latest events:"]
    lines += [_line(e) for e in reversed(stats["events"]["recent"])]
    return "\n".join(lines), stats


def _top(args: argparse.Namespace) -> int:
    url, headers = _master(args), _headers(args)
    prev = None
    for i in range(args.iterations or sys.maxsize):
        text, prev = _top_once(url, headers, prev)
        if sys.stdout.isatty():
            sys.stdout.write("\x1b[H\x1b[2J")
        print(text, flush=True)
        if args.iterations and i + 1 >= args.iterations:
            break
        time.sleep(args.interval)
    return 0


def _top_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.add_argument("--iterations", "-n", type=int, help="refresh this many times, then exit")


# -- drain ---------------------------------------------------------------------------------

def _drain_line(node: str, st: dict[str, Any]) -> str:
    line = (f"node {node}: {st['state']}  moved {st['moved']}  dropped {st['dropped']}  "
            f"left {st['left']}")
    return line + (f"  ({st['note']})" if st.get("note") else "")


def _drain(args: argparse.Namespace) -> int:
    url, headers = _master(args), _headers(args)
    path = f"/v1/nodes/{urllib.parse.quote(args.node, safe='')}/drain"
    if args.cancel:
        st = _call(url, path, headers, method="DELETE")
        print(json.dumps(st) if args.json else _drain_line(args.node, st))
        return 0
    st = _call(url, path, headers, {"timeout_s": args.timeout}, "POST")
    while args.wait and st["state"] == "draining":
        if not args.json:
            print(_drain_line(args.node, st), flush=True)
        time.sleep(args.interval)
        st = _call(url, path, headers)
    if args.json:
        print(json.dumps(st))
    else:
        print(_drain_line(args.node, st))
        if st["state"] == "drained":
            print(f"node {args.node} holds no block: stop its daemon now; nothing is lost")
        elif st["state"] == "stuck":
            print(f"run `kvpool drain {args.node}` again to resume, or `kvpool drain "
                  f"{args.node} --cancel` to keep the node", file=sys.stderr)
        elif not args.wait:
            print(f"follow it with `kvpool drain {args.node} --wait`, or `kvpool status`")
    return 1 if st["state"] == "stuck" else 0


def _drain_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("node", help="the node id to drain")
    p.add_argument("--wait", action="store_true", help="wait until the node is drained (or stuck)")
    p.add_argument("--timeout", type=float, default=300.0,
                   help="the drain's deadline in seconds (default 300)")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between progress lines")
    p.add_argument("--cancel", action="store_true",
                   help="stop draining: the node takes new blocks again")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")


# -- block ---------------------------------------------------------------------------------

def _block(args: argparse.Namespace) -> int:
    key = args.key.strip().lower()
    if len(key) != 32 or any(c not in "0123456789abcdef" for c in key):
        raise Refused(f"{args.key!r} is not a block key: give its 32 hex characters "
                      "(as `kvpool events` prints them)")
    b = _call(_master(args), f"/v1/blocks/{key}", _headers(args))
    if args.json:
        print(json.dumps(b, indent=2))
        return 0
    print(f"block {b['key']}  {b['state']}  {human(b['size'])}  pins {b['pins']}  "
          f"leases {b['leases']}" + (f"  parent {b['parent']}" if b.get("parent") else ""))
    rows = [[r["node"], r["tier"], r.get("node_state", "-"), r["location"], human(r["size"])]
            for r in b["replicas"]]
    print(table(["node", "tier", "node state", "location", "stored"], rows))
    return 0


def _block_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("key", help="the block key, 32 hex characters")
    p.add_argument("--json", action="store_true", help="print the answer as JSON")


# -- pin, unpin, evict ---------------------------------------------------------------------

def _keys_of(raw: list[str]) -> list[str]:
    keys = [k.strip().lower() for k in raw]
    for given, key in zip(raw, keys):
        if len(key) != 32 or any(c not in "0123456789abcdef" for c in key):
            raise Refused(f"{given!r} is not a block key: give its 32 hex characters "
                          "(as `kvpool events` prints them)")
    return keys


def _pinning(action: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        url, headers = _master(args), _headers(args)
        for key in _keys_of(args.keys):
            _call(url, f"/v1/blocks/{key}/{action}", headers, {}, method="POST")
            print(f"{action}ned {key}")
        return 0
    return run


def _pin_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("keys", nargs="+", metavar="KEY", help="block keys, 32 hex characters each")


def _evict(args: argparse.Namespace) -> int:
    res = _call(_master(args), "/v1/evict", _headers(args), {"tier": args.tier, "fill": args.fill},
                method="POST")
    print(f"{args.tier}: demoted {human(res['freed_bytes'])} of its coldest unpinned blocks "
          f"(down to {args.fill:.0%} full)")
    return 0


def _evict_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--tier", default="host", choices=["gpu", "host", "ssd", "object"],
                   help="the tier to relieve (default host)")
    p.add_argument("--fill", type=float, default=0.0,
                   help="how full to leave it, 0..1 (default 0: everything movable goes down)")


# -- tenants -------------------------------------------------------------------------------

def _tenants(args: argparse.Namespace) -> int:
    res = _call(_master(args), "/v1/tenants", _headers(args))
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    if not res["enabled"]:
        print("no tenants configured: every client credential is the default tenant's")
    rows = []
    for t in res["tenants"]:
        tiers = t["tiers"] or {"-": {"used": 0, "replicas": 0, "quota": None}}
        for i, (tier, u) in enumerate(sorted(tiers.items())):
            quota = u["quota"]
            rows.append([t["name"] if i == 0 else "", t["kind"] if i == 0 else "", tier,
                         human(u["used"]), u["replicas"], human(quota) if quota else "-",
                         f"{u['used'] / quota:.0%}" if quota else "-",
                         (f"{t['puts_open']}/{t['max_puts'] or '-'}") if i == 0 else ""])
    print(table(["tenant", "kind", "tier", "used", "replicas", "quota", "of quota", "puts open"], rows))
    return 0


def _tenants_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--json", action="store_true", help="print the master's answer as JSON")


# -- trace ---------------------------------------------------------------------------------

def _trace(args: argparse.Namespace) -> int:
    rid = urllib.parse.quote(args.request_id, safe="")
    spans = list(_call(_master(args), f"/v1/traces/{rid}", _headers(args))["spans"])
    for router in args.router or []:
        spans += _call(router.rstrip("/"), f"/v1/traces/{rid}", {})["spans"]
    spans.sort(key=lambda s: (s["start"], -s["duration_ms"]))
    if args.json:
        print(json.dumps(spans, indent=2))
        return 0
    if not spans:
        print(f"no spans of request {args.request_id}: the master keeps the most recent "
              "requests only; give the router too with --router URL", file=sys.stderr)
        return 1
    t0 = spans[0]["start"]
    rows = [[f"+{1e3 * (s['start'] - t0):.1f}", s["where"], s["by"] or "-", s["name"],
             f"{s['duration_ms']:.2f}", s["detail"] or "-", s["error"] or ""] for s in spans]
    when = datetime.fromtimestamp(t0).strftime("%H:%M:%S.%f")[:-3]
    print(f"request {args.request_id}: {len(spans)} spans from {when}")
    print(table(["at ms", "where", "by", "step", "took ms", "detail", "error"], rows))
    return 0


def _trace_arguments(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("request_id", help="the request id (or a traceparent's 32-hex trace id)")
    p.add_argument("--router", action="append",
                   help="a router's URL: its spans of the request join the master's (repeatable)")
    p.add_argument("--json", action="store_true", help="print the spans as JSON")


EVENTS = Verb("events", "follow the pool's KV events", _events_arguments, _guarded(_events))
PURGE = Verb("purge", "remove a namespace's, a model's or every block", _purge_arguments,
             _guarded(_purge))
DRAIN = Verb("drain", "move a node's blocks to other nodes, then say it can be stopped",
             _drain_arguments, _guarded(_drain))
BLOCK = Verb("block", "one block's replicas, state, pins and leases", _block_arguments,
             _guarded(_block))
TRACE = Verb("trace", "one request's steps: router, prefill, pool puts, decode gets",
             _trace_arguments, _guarded(_trace))
PIN = Verb("pin", "pin blocks: never demoted or evicted until unpinned", _pin_arguments,
           _guarded(_pinning("pin")))
UNPIN = Verb("unpin", "release one pin of each block", _pin_arguments, _guarded(_pinning("unpin")))
EVICT = Verb("evict", "demote a tier's coldest unpinned blocks down to a fill level",
             _evict_arguments, _guarded(_evict))
TENANTS = Verb("tenants", "per tenant: bytes per tier against its quota, puts in flight",
               _tenants_arguments, _guarded(_tenants))
TOP = Verb("top", "a live view: tiers, hit rate, ops/s, latest events", _top_arguments,
           _guarded(_top))
