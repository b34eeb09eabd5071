"""Tenants against a real `kvpool up` with credentials on 127.0.0.1: two tenants, a shared
namespace, a tenant with quotas, and the default (legacy) client credential next to them.
A tenant cannot read, match, remove, pin or pre-place another's blocks, nor see them in
events, even holding the other's keys; a quota refuses with its typed error and the admin
API and CLI report it. Alice and Bob own arena regions: their blocks land there, and the
NIXL metadata their credentials get reaches their own region only."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import numpy as np
import pytest

from clients import ops_cli
from clients.client import AsyncPoolClient
from kvpool.config import ClientConfig
from kvpool.errors import BlockNotFound, Forbidden, QuotaExceeded, TooManyPending
from kvpool.keys import Namespace, block_keys
from kvpool.launcher import spawn, stop
from kvpool.protocol import Call
from tests.integration.test_security import http, rpc

T = {name: f"{name}-" + name[0] * 40 for name in
     ("alice", "bob", "carol", "legacy", "admin", "viewer", "alice-view", "cluster")}
SECRETS = {"alice": "alice-keys-" + "1" * 30, "bob": "bob-keys-" + "2" * 30,
           "carol": "carol-keys-" + "3" * 30, "sys": "sys-prompt-keys-" + "4" * 30}
BLOCK = 16 << 10  # bytes per test block
CONFIG = f"""
[master]
client_tokens = "{T['legacy']}"
admin_token = "{T['admin']}"
viewer_token = "{T['viewer']}"
cluster_token = "{T['cluster']}"
sweep_interval_s = 0.2

[[master.tenants]]
name = "alice"
token = "env:TEST_ALICE_TOKEN"
viewer_token = "{T['alice-view']}"
namespaces_shared = ["sys"]
arena_share = 0.25

[[master.tenants]]
name = "bob"
token = "file:{{dir}}/bob.token"
namespaces_shared = ["sys"]
arena_share = 0.25

[[master.tenants]]
name = "carol"
token = "{T['carol']}"
quota_bytes = {{host = {3 * BLOCK}}}
max_puts = 2

[[master.namespaces]]
name = "sys"
tenants = ["alice", "bob"]

[daemon]
host_bytes = "16MiB"
ssd_bytes = "64MiB"
object_bytes = 0
"""


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    tmp = tmp_path_factory.mktemp("tenants")
    (tmp / "bob.token").write_text(T["bob"] + "\n")
    (tmp / "pool.toml").write_text(CONFIG.replace("{dir}", str(tmp)))
    proc, info = spawn("kvpool", ["up", "--port", "0", "--data-dir", str(tmp / "data"),
                                  "--config", str(tmp / "pool.toml")],
                       {"TEST_ALICE_TOKEN": T["alice"]}, tmp / "up.log")
    try:
        yield info["master"]
    finally:
        stop(proc)


def client(url: str, who: str, namespace: str = "", rpc: str = "stream",
           data_path: str = "auto") -> AsyncPoolClient:
    key = SECRETS.get(namespace or who, "")
    return AsyncPoolClient(ClientConfig(master_url=url, token=T[who], key_secret=key,
                                        namespace=namespace, rpc=rpc, data_path=data_path))


def keys_of(c: AsyncPoolClient, prompt: list[int], model: str = "tenants") -> list[bytes]:
    ns = Namespace(model_id=model, dtype="uint8", kv_layout="raw", block_tokens=4,
                   secret=c.key_secret)
    return block_keys(ns, prompt)


def blocks(n: int) -> list[np.ndarray]:
    return [np.frombuffer(os.urandom(BLOCK), np.uint8) for _ in range(n)]


PROMPT = list(range(12))  # three blocks


async def test_the_same_prompt_has_other_keys_per_tenant(pool: str) -> None:
    async with client(pool, "alice") as a, client(pool, "bob") as b, client(pool, "legacy") as d:
        ka, kb, kd = keys_of(a, PROMPT), keys_of(b, PROMPT), keys_of(d, PROMPT)
        assert len({*ka, *kb, *kd}) == 9
        assert keys_of(a, PROMPT) == ka  # the tenant's engines agree among themselves


async def test_a_tenant_cannot_touch_anothers_blocks_even_with_its_keys(pool: str) -> None:
    async with client(pool, "alice") as a, client(pool, "bob") as b:
        ka = keys_of(a, PROMPT, "isolation")
        mine = blocks(3)
        assert all(r.stored for r in await a.batch_put(ka, mine, chained=True))
        # Bob holds Alice's keys (leaked, say): the pool shows him nothing of hers.
        assert await b.batch_exists(ka) == [False] * 3
        assert await b.match_prefix(ka) == 0
        assert not any(r.hit for r in await b.batch_get(ka, [np.empty(BLOCK, np.uint8)] * 3))
        assert await b.batch_remove(ka) == 0
        for verb in (b.pin, b.unpin):
            with pytest.raises(BlockNotFound, match=ka[0].hex()):
                await verb(ka)
        # ... and his put of the same keys is a block of his own, not a hit on hers.
        theirs = blocks(3)
        assert all(r.stored for r in await b.batch_put(ka, theirs, chained=True))
        got_b, got_a = [np.empty(BLOCK, np.uint8) for _ in ka], [np.empty(BLOCK, np.uint8) for _ in ka]
        assert all(r.hit for r in await b.batch_get(ka, got_b))
        assert all(r.hit for r in await a.batch_get(ka, got_a))
        assert all(np.array_equal(x, y) for x, y in zip(got_b, theirs))
        assert all(np.array_equal(x, y) for x, y in zip(got_a, mine))
        assert await a.match_prefix(ka) == 3
        assert await b.batch_remove(ka) == 3  # his copies go; hers stay
        assert await a.match_prefix(ka) == 3
    # An operator finds her block by the key her events show, with its scope.
    status, block = http(pool, f"/v1/blocks/{ka[0].hex()}?scope=alice", token=T["viewer"])
    assert status == 200 and block["size"] == BLOCK
    assert http(pool, f"/v1/blocks/{ka[0].hex()}", token=T["viewer"])[0] == 404
    assert http(pool, f"/v1/blocks/{ka[0].hex()}?scope=nobody", token=T["viewer"])[0] == 404
    assert http(pool, f"/v1/blocks/{ka[0].hex()}?scope=a%20b", token=T["viewer"])[0] == 400
    assert rpc(pool, Call.CHECK, token=T["admin"])  # index, usage and inventories agree


async def test_the_default_credential_works_as_before_and_apart(pool: str) -> None:
    async with client(pool, "legacy") as d, client(pool, "alice") as a:
        kd = keys_of(d, PROMPT, "legacy")
        values = blocks(3)
        assert all(r.stored for r in await d.batch_put(kd, values))
        out = [np.empty(BLOCK, np.uint8) for _ in kd]
        assert all(r.hit for r in await d.batch_get(kd, out))
        assert all(np.array_equal(x, y) for x, y in zip(out, values))
        assert await a.batch_exists(kd) == [False] * 3
    with pytest.raises(Forbidden, match="namespace 'sys'"):
        async with client(pool, "legacy", "sys") as outsider:
            await outsider.batch_exists(kd)


async def test_a_shared_namespace_serves_its_members_only(pool: str) -> None:
    # Bob over the WebSocket RPC (the namespace in its handshake), Alice over the stream's hello.
    async with client(pool, "alice", "sys") as a, client(pool, "bob", "sys", rpc="ws") as b:
        ks = keys_of(a, PROMPT, "system-prompt")
        assert keys_of(b, PROMPT, "system-prompt") == ks  # one secret, one set of keys
        values = blocks(3)
        assert all(r.stored for r in await a.batch_put(ks, values))
        out = [np.empty(BLOCK, np.uint8) for _ in ks]
        assert all(r.hit for r in await b.batch_get(ks, out))
        assert all(np.array_equal(x, y) for x, y in zip(out, values))
    async with client(pool, "alice") as own:  # Alice's own namespace is another scope
        assert await own.batch_exists(ks) == [False] * 3
    for rpc in ("stream", "ws"):
        with pytest.raises(Forbidden, match="may not use the namespace"):
            async with client(pool, "carol", "sys", rpc=rpc) as carol:
                await carol.batch_exists(ks)


async def _events(url: str, token: str, after: int, seconds: float = 1.5) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    timeout = aiohttp.ClientTimeout(total=seconds)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        try:
            async with session.get(url + "/v1/events", params={"last_event_id": str(after)},
                                   headers={"Authorization": f"Bearer {token}"}) as resp:
                assert resp.status == 200, await resp.text()
                async for raw in resp.content:
                    line = raw.decode().strip()
                    if line.startswith("data:"):
                        out.append(json.loads(line[5:]))
        except asyncio.TimeoutError:
            pass
    return out


async def test_a_tenants_viewer_sees_its_own_events_only(pool: str) -> None:
    last = http(pool, "/v1/stats", token=T["viewer"])[1]["events"]["last_id"]
    async with client(pool, "alice") as a, client(pool, "bob") as b:
        ka, kb = keys_of(a, PROMPT, "events"), keys_of(b, PROMPT, "events")
        await a.batch_put(ka, blocks(3), chained=True)
        await b.batch_put(kb, blocks(3), chained=True)
    seen = await _events(pool, T["alice-view"], last)
    stored = [e for e in seen if e["type"] == "BlockStored"]
    hashes = {h for e in stored for h in e["block_hashes"]}
    assert hashes == {k.hex() for k in ka}  # her keys as her engines know them; none of Bob's
    assert all(e["scope"] == "alice" for e in stored)
    # her chain is one event, its parent link as she named it
    assert [e["block_hashes"] for e in stored] == [[k.hex() for k in ka]]
    assert stored[0]["parent_block_hash"] is None
    everything = await _events(pool, T["viewer"], last)  # the pool's viewer sees both
    assert {h for e in everything for h in e.get("block_hashes", [])} >= {k.hex() for k in ka + kb}
    # A tenant's viewer reads nothing else, and a tenant's client credential no events.
    assert http(pool, "/v1/nodes", token=T["alice-view"])[0] == 403
    assert http(pool, "/v1/events", token=T["alice"])[0] == 403


async def test_quotas_refuse_with_a_typed_error_and_are_reported(pool: str, capsys) -> None:
    async with client(pool, "carol") as c:
        ks = keys_of(c, list(range(20)), "quota")  # five blocks; her host quota holds three
        values = blocks(5)
        assert all(r.stored for r in await c.batch_put(ks[:3], values[:3], chained=True))
        assert await c.pin(ks[:3]) == 3  # pinned: nothing of hers can make room
        with pytest.raises(QuotaExceeded, match="carol"):
            await c.batch_put(ks[3:4], values[3:4])
        assert await c.unpin(ks[:3]) == 3
        # Unpinned, her own coldest blocks are demoted to SSD to make room.
        assert all(r.stored for r in await c.batch_put(ks[3:5], values[3:5]))
        status, body = http(pool, "/v1/tenants", token=T["viewer"])
        assert status == 200
        rows = {r["name"]: r for r in body["tenants"]}
        assert rows["carol"]["tiers"]["host"]["quota"] == 3 * BLOCK
        assert rows["carol"]["tiers"]["host"]["used"] <= 3 * BLOCK
        assert rows["carol"]["tiers"]["ssd"]["used"] >= 2 * BLOCK
        out = [np.empty(BLOCK, np.uint8) for _ in ks]
        assert all(r.hit for r in await c.batch_get(ks, out))  # all readable, some from SSD
        assert all(np.array_equal(x, y) for x, y in zip(out, values))
    assert {"alice", "bob", "sys", "default"} <= set(rows)
    own = http(pool, "/v1/tenants", token=T["alice-view"])[1]["tenants"]
    assert {r["name"] for r in own} == {"alice", "sys"}  # a tenant's viewer: its own rows
    args = argparse.Namespace(command="tenants", master=pool, token=T["viewer"], config=None,
                              json=False)
    assert ops_cli._tenants(args) == 0
    printed = capsys.readouterr().out
    assert "carol" in printed and "48.0 KiB" in printed and "of quota" in printed


async def test_an_admins_purge_reaches_every_tenant(pool: str) -> None:
    import urllib.request
    req = urllib.request.Request(pool + "/v1/purge", data=json.dumps({"all": True}).encode(),
                                 method="POST", headers={"Authorization": f"Bearer {T['admin']}",
                                                         "Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        assert json.loads(resp.read())["purged"] > 0
    async with client(pool, "alice") as a:
        assert await a.match_prefix(keys_of(a, PROMPT, "isolation")) == 0
    rows = http(pool, "/v1/tenants", token=T["viewer"])[1]["tenants"]
    held = [(r["name"], t) for r in rows for t, u in r["tiers"].items() if u["used"] or u["replicas"]]
    assert held == []  # every scope's usage went with its blocks
    assert rpc(pool, Call.CHECK, token=T["admin"])


def test_a_tenants_puts_in_flight_are_limited(pool: str) -> None:
    ns = Namespace(model_id="inflight", dtype="uint8", kv_layout="raw", block_tokens=4)
    ks = block_keys(ns, list(range(12)))

    async def run() -> None:
        from kvpool.wire import RpcClient
        conns = [RpcClient(pool, token=T["carol"]) for _ in range(3)]  # her connections together
        try:
            for conn, key in zip(conns[:2], ks):
                await conn.call(Call.RESERVE, {"keys": [key], "sizes": [4096]})
            with pytest.raises(TooManyPending, match="max_puts = 2"):
                await conns[2].call(Call.RESERVE, {"keys": [ks[2]], "sizes": [4096]})
            rows = {r["name"]: r for r in http(pool, "/v1/tenants", token=T["viewer"])[1]["tenants"]}
            assert rows["carol"]["puts_open"] == 2
        finally:
            for conn in conns:
                await conn.close()

    asyncio.run(run())


def regions(url: str) -> dict[str, dict[str, Any]]:
    """Each scope's host region on the pool's one node, as /v1/tenants reports it."""
    status, body = http(url, "/v1/tenants", token=T["viewer"])
    assert status == 200
    return {row["name"]: {**row, "host": next(r for r in row["regions"] if r["tier"] == "host")}
            for row in body["tenants"]}


def host_offsets(url: str, keys: list[bytes], scope: str) -> list[int]:
    out = []
    for k in keys:
        status, block = http(url, f"/v1/blocks/{k.hex()}?scope={scope}", token=T["viewer"])
        assert status == 200
        out += [r["location"] for r in block["replicas"] if r["tier"] == "host"]
    return out


async def test_a_tenants_blocks_land_in_its_own_arena_region(pool: str) -> None:
    async with client(pool, "alice") as a, client(pool, "bob") as b, client(pool, "legacy") as d:
        puts = {"alice": (a, keys_of(a, PROMPT, "regions")), "bob": (b, keys_of(b, PROMPT, "regions")),
                "default": (d, keys_of(d, PROMPT, "regions"))}
        for c, ks in puts.values():
            assert all(r.stored for r in await c.batch_put(ks, blocks(3), chained=True))
    rows = regions(pool)
    assert rows["alice"]["arena_share"] == 0.25 and rows["carol"]["arena_share"] == 0.0
    bounds = {name: (rows[name]["host"]["offset"], rows[name]["host"]["offset"] + rows[name]["host"]["size"])
              for name in ("alice", "bob", "default")}
    assert bounds["alice"][1] <= bounds["bob"][0] and bounds["bob"][1] <= bounds["default"][0]
    assert rows["carol"]["host"]["region"] == rows["default"]["host"]["region"] == "common"
    assert rows["alice"]["host"]["size"] == 4 << 20  # a quarter of the 16 MiB host arena
    for name, (_, ks) in puts.items():
        lo, hi = bounds[name]
        offsets = host_offsets(pool, ks, name)
        assert len(offsets) == 3 and all(lo <= o and o + BLOCK <= hi for o in offsets), (name, offsets)
    assert rows["alice"]["host"]["used"] >= 3 * BLOCK


async def test_a_tenants_nixl_metadata_reaches_its_own_region_only(pool: str) -> None:
    """Alice, running a modified client, asks for the daemon's NIXL metadata with her
    credential and READs at Bob's block's address: NIXL refuses, no byte arrives. The same
    READ at her own block's address works, as do her engine's puts and gets over NIXL; the
    default tenant's metadata (the common region) does not reach hers either."""
    from kvpool.errors import TransferFailed
    from kvpool.transfer import TransferAgent

    async with client(pool, "alice", data_path="nixl") as a, \
            client(pool, "bob", data_path="nixl") as b:
        ka, kb = keys_of(a, PROMPT[:4], "nixl"), keys_of(b, PROMPT[:4], "nixl")
        mine, his = blocks(1)[0], blocks(1)[0]
        assert (await a.batch_put(ka, [mine]))[0].stored and (await b.batch_put(kb, [his]))[0].stored
        got = np.empty(BLOCK, np.uint8)
        assert (await a.batch_get(ka, [got]))[0].hit and np.array_equal(got, mine)
    rows = regions(pool)
    status, nodes = http(pool, "/v1/nodes", token=T["viewer"])
    agent = nodes["nodes"][0]["agent"]

    def address(scope: str, k: bytes) -> int:
        region = rows[scope]["host"]
        [offset] = host_offsets(pool, [k], scope)
        return region["address"] + offset - region["offset"]

    def metadata(who: str) -> bytes:
        return bytes(rpc(pool, Call.AGENTS, {"agents": [agent]}, token=T[who])["metadata"][agent])

    assert len({metadata("alice"), metadata("bob"), metadata("legacy"), metadata("admin")}) == 4
    buf = np.zeros(BLOCK + 4096, np.uint8)
    local = [(buf.ctypes.data, buf.nbytes, 0)]

    async def read(who: str, at: int) -> None:
        spy = TransferAgent(f"{who}-spy", progress_thread=False, host="127.0.0.1")
        try:
            spy.register(buf.ctypes.data, buf.nbytes, owner=buf)
            peer = spy.add_peer(metadata(who))
            await spy.run("READ", peer, local, "DRAM", [(at, buf.nbytes, 0)], "DRAM", 5.0)
        finally:
            for region in spy.regions:
                spy.deregister(region)
            spy.close()

    for who, at in (("alice", address("bob", kb[0])), ("legacy", address("alice", ka[0]))):
        with pytest.raises(TransferFailed):
            await read(who, at)
        assert not buf.any()  # not one byte of the other's
    await read("alice", address("alice", ka[0]))
    assert mine.tobytes() in buf.tobytes()  # her own block, header and all
