"""The one ``kvpool`` command, and what its verbs share.

The core cannot import the packages above it, so the verbs that start a master or look
at a pool live with them (``master/cli.py``, ``clients/cli.py``) and register here as
Python entry points in the group ``kvpool.commands`` (see pyproject.toml): each entry
names a ``Verb``. Only ``daemon`` is the core's own. ``python -m kvpool`` runs it too.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import signal
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable, Coroutine

from kvpool import heap, logs
from kvpool.config import PoolConfig, load
from kvpool.errors import ConfigError, KVPoolError
from kvpool.tasks import run as run_loop

GROUP = "kvpool.commands"


@dataclass(frozen=True, slots=True)
class Verb:
    """One subcommand: its arguments, and what runs it (returns the exit status)."""

    name: str
    help: str
    arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def serving(main: Callable[[argparse.Namespace], Coroutine[Any, Any, None]]
            ) -> Callable[[argparse.Namespace], int]:
    """A verb's ``run`` from a coroutine that serves until a signal; a server process
    freezes what survives full collections (kvpool.heap)."""
    def run(args: argparse.Namespace) -> int:
        heap.freeze_survivors()
        run_loop(main(args))
        return 0
    return run


# -- what verbs share ------------------------------------------------------------------

def human(n: float) -> str:
    """Bytes as a person reads them: ``512 B``, ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def table(headers: list[str], rows: list[list[Any]]) -> str:
    """Columns padded to their widest cell, with a rule under the headers."""
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


async def until_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def announce(what: dict[str, Any]) -> None:
    """One JSON line on stdout a script can parse: the endpoints a server listens on."""
    print(json.dumps(what), flush=True)


def config(args: argparse.Namespace) -> PoolConfig:
    """The config file named by ``--config``, with the command line's overrides."""
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


def config_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML config file (see configs/)")


# -- the core's own verb ------------------------------------------------------------------

def _daemon_arguments(d: argparse.ArgumentParser) -> None:
    config_argument(d)
    d.add_argument("--master", help="master URL, e.g. http://127.0.0.1:7700")
    d.add_argument("--host")
    d.add_argument("--daemon-port", "--port", dest="daemon_port", type=int)
    d.add_argument("--data-dir")
    d.add_argument("--node-id")
    d.add_argument("--etcd", help="etcd endpoint host:port: join a cluster (instead of --master)")
    d.add_argument("--cluster", help="cluster name (default 'default')")


async def _daemon(args: argparse.Namespace) -> None:
    from kvpool.daemon import PoolDaemon

    cfg = config(args)
    daemon = await PoolDaemon(cfg.daemon).start()
    joined = (f"cluster {cfg.daemon.cluster!r} through etcd {cfg.daemon.etcd}" if cfg.daemon.etcd
              else f"master {cfg.daemon.master_url}")
    print(f"kvpool daemon {cfg.daemon.node_id} at {daemon.url}, {joined}", flush=True)
    announce({"daemon": daemon.url})
    try:
        await until_signal()
    finally:
        await daemon.stop()


DAEMON = Verb("daemon", "run a pool daemon", _daemon_arguments, serving(_daemon))


def verbs() -> list[Verb]:
    """The core's verbs and every installed package's, by name; two of one name are an error."""
    found = {DAEMON.name: DAEMON}
    for ep in entry_points(group=GROUP):
        verb = ep.load()
        if not isinstance(verb, Verb) or verb.name != ep.name:
            raise ConfigError(f"entry point {ep.name} = {ep.value} in {GROUP} is not the Verb "
                              f"named {ep.name!r}")
        if found.setdefault(ep.name, verb) is not verb:
            raise ConfigError(f"two packages register the kvpool verb {ep.name!r}")
    return sorted(found.values(), key=lambda v: v.name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kvpool", description="a tiered KV-cache block pool")
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    parser.add_argument("--log-format", choices=logs.FORMATS, help="text (default) or json: "
                        "one JSON object a line (default: KVPOOL_LOG_FORMAT)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    by_name: dict[str, Verb] = {}
    try:
        found = verbs()
    except (ConfigError, ImportError, AttributeError) as exc:
        print(f"kvpool: a registered verb does not load: {exc}", file=sys.stderr)
        return 2
    for verb in found:
        verb.arguments(sub.add_parser(verb.name, help=verb.help))
        by_name[verb.name] = verb
    if len(by_name) == 1:  # the package's metadata predates its entry points
        print(f"kvpool: only `daemon` is registered; reinstall kvpool (pip install -e .) so "
              f"its {GROUP} entry points are known", file=sys.stderr)
    args = parser.parse_args(argv)
    try:
        logs.setup(logging.DEBUG if args.verbose else logging.INFO, args.log_format)
    except ConfigError as exc:
        print(f"kvpool: {exc}", file=sys.stderr)
        return 2
    try:
        return by_name[args.command].run(args)
    except KVPoolError as exc:
        print(f"kvpool {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
