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

from kvpool.coordinator import EventKind
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


async def sync(core: MasterCore, prefix: str) -> None:
    """Make the index's nodes the listed ones; returns once every listed daemon is in
    (a listed daemon that does not answer is retried until its lease runs out)."""
    while True:
        listed = {k[len(prefix):]: v for k, v in (await core.coord.get_prefix(prefix)).items()}
        for node_id in list(core.nodes):
            if node_id not in listed:
                await core.drop_node(node_id, "membership lease expired")
        waiting = []
        for node_id, value in listed.items():
            try:
                await pull(core, node_id, value)
            except (KVPoolError, ValueError, KeyError) as exc:
                log.warning("cannot pull node %s yet: %s", node_id, exc)
                waiting.append(node_id)
        if not waiting:
            return
        await asyncio.sleep(0.2)


async def follow_members(core: MasterCore) -> None:
    """Run while leading: rebuild, become ready, then follow membership changes."""
    prefix = f"{core.prefix}nodes/"
    while True:
        watch = None
        try:
            watch = await core.coord.watch_prefix(prefix)
            await sync(core, prefix)
            if not core.ready:
                core.ready = True
                log.info("index rebuilt from %d nodes: %d blocks; serving", len(core.nodes),
                         len(core.index))
            async for event in watch:
                node_id = event.key[len(prefix):]
                if event.kind is EventKind.DELETE:
                    await core.drop_node(node_id, "membership lease expired")
                elif event.value is not None and _agent(event.value) != getattr(
                        core.nodes.get(node_id), "agent", None):
                    try:
                        await pull(core, node_id, event.value)
                    except (KVPoolError, ValueError, KeyError) as exc:
                        log.warning("cannot pull node %s: %s; listing again", node_id, exc)
                        break
        except KVPoolError as exc:
            log.warning("membership watch broke: %s; listing again", exc)
        finally:
            if watch is not None:
                await watch.aclose()
        await asyncio.sleep(0.2)
