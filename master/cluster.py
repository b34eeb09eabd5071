"""The leader's view of membership with etcd: ``nodes/<id>`` keys drive the index.

The daemons own their keys (leased, see kvpool.membership). The leader lists them, pulls
each daemon's registration (tiers, NIXL metadata, whole inventory) over RPC, and is ready
once every listed daemon is in; from then on a new key pulls a node in and a deleted key
(its lease ran out) drops the node's replicas at once. A broken watch starts over with a
full listing, so nothing that happened meanwhile is missed.
"""

from __future__ import annotations

import asyncio
import json
import logging

from kvpool.coordinator import EventKind, WatchEvent
from kvpool.errors import KVPoolError
from kvpool.wire import RpcClient
from master.core import MasterCore

log = logging.getLogger(__name__)


def _agent(value: bytes) -> str:
    try:
        return str(json.loads(value)["agent"])
    except (ValueError, KeyError, TypeError):
        return ""


async def pull(core: MasterCore, node_id: str, value: bytes) -> None:
    """Take the daemon a membership key describes into the index (if not in already)."""
    info = json.loads(value)
    known = core.nodes.get(node_id)
    if known is not None and known.agent == info.get("agent"):
        return
    link = RpcClient(str(info["url"]), timeout_s=30.0, path="/v1/d/rpc")
    try:
        # The first node of a rebuild lists a shared object store again, so blocks that
        # nodes gone since demoted there are found.
        rescan = not core.ready and not core.stores
        body = await link.call("registration", {"rescan": rescan}, timeout_s=30.0)
        if body.get("agent") != info.get("agent") or body.get("node_id") != node_id:
            raise KVPoolError(f"{info['url']} is no longer the daemon {node_id} that etcd lists")
    except BaseException:
        await link.close()
        raise
    await core.join(body, link)


async def sync(core: MasterCore, prefix: str) -> set[str]:
    """Make the index's nodes the listed ones: drop the unlisted, pull the new. Returns
    the listed nodes that could not be pulled (not answering yet, or dying)."""
    listed = {k[len(prefix):]: v for k, v in (await core.coord.get_prefix(prefix)).items()}
    for node_id in list(core.nodes):
        if node_id not in listed:
            await core.drop_node(node_id, "membership lease expired")
    missing = set()
    for node_id, value in listed.items():
        try:
            await pull(core, node_id, value)
        except (KVPoolError, ValueError, KeyError, TypeError) as exc:
            log.warning("cannot pull node %s yet: %s", node_id, exc)
            missing.add(node_id)
    return missing


async def follow_members(core: MasterCore) -> None:
    """Run while leading: rebuild, become ready, then follow membership changes.

    The rebuild waits for every listed daemon, or for its key to go (a daemon that died
    just before keeps its key until its lease runs out), at most ``node_ttl_s`` + 2 s;
    a daemon still missing then is pulled again every 2 s while the leader serves."""
    prefix = f"{core.prefix}nodes/"
    loop = asyncio.get_running_loop()
    while True:
        watch = None
        pending: asyncio.Future[WatchEvent] | None = None
        try:
            watch = await core.coord.watch_prefix(prefix)
            events = watch.__aiter__()
            missing = await sync(core, prefix)
            if not core.ready:
                end = loop.time() + core.cfg.node_ttl_s + 2.0
                while missing and loop.time() < end:
                    await asyncio.sleep(0.2)
                    missing = await sync(core, prefix)
                if missing:
                    log.error("serving without node(s) %s, which are listed but do not answer",
                              ", ".join(sorted(missing)))
                core.ready = True
                log.info("index rebuilt from %d nodes: %d blocks; serving", len(core.nodes),
                         len(core.index))
            while True:
                # The next event is awaited by a task of its own: cancelling a watch's
                # iterator mid-wait would end it, so a timeout only stops our waiting.
                if pending is None:
                    pending = asyncio.ensure_future(events.__anext__())
                done, _ = await asyncio.wait({pending}, timeout=2.0 if missing else None)
                if not done:
                    missing = await sync(core, prefix)
                    continue
                event, pending = pending.result(), None
                node_id = event.key[len(prefix):]
                if event.kind is EventKind.DELETE:
                    missing.discard(node_id)
                    await core.drop_node(node_id, "membership lease expired")
                elif event.value is not None and _agent(event.value) != getattr(
                        core.nodes.get(node_id), "agent", None):
                    try:
                        await pull(core, node_id, event.value)
                        missing.discard(node_id)
                    except (KVPoolError, ValueError, KeyError, TypeError) as exc:
                        log.warning("cannot pull node %s: %s; trying again", node_id, exc)
                        missing.add(node_id)
        except (KVPoolError, StopAsyncIteration) as exc:
            log.warning("membership watch ended: %s; listing again", exc or type(exc).__name__)
        finally:
            if pending is not None:
                pending.cancel()
            if watch is not None:
                await watch.aclose()
        await asyncio.sleep(0.2)
