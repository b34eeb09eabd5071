"""Operating a live pool (`kvpool up` as a process): the KV event stream (order, resume,
lag told), the `kvpool events` and `kvpool purge` verbs, Prometheus metrics on the master
and the daemon moving with the work, and every series the Grafana dashboard queries."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import aiohttp
import numpy as np
import pytest

from clients.client import AsyncPoolClient
from kvpool.config import ClientConfig
from kvpool.keys import Namespace, block_keys
from kvpool.launcher import spawn, stop
from tests.integration.conftest import ROOT, admin, wait_for

RING = 64
BLOCK = 64 * 1024
NS_A = Namespace("model-a", "float16", "test-layout", block_tokens=4)
NS_B = Namespace("model-b", "float16", "test-layout", block_tokens=4)


@dataclass
class Up:
    proc: subprocess.Popen
    master: str
    daemon: str

    def client(self) -> AsyncPoolClient:
        return AsyncPoolClient(ClientConfig(master_url=self.master))


def start_up(tmp: Path, env: dict[str, str] | None = None) -> Up:
    base = {"KVPOOL_MASTER_EVENTS_RING": str(RING), "KVPOOL_MASTER_SWEEP_INTERVAL_S": "0.2",
            "KVPOOL_DAEMON_HOST_BYTES": "8MiB", "KVPOOL_DAEMON_SSD_BYTES": "64MiB",
            "KVPOOL_DAEMON_OBJECT_BYTES": "256MiB", "KVPOOL_DAEMON_HEARTBEAT_S": "0.5"}
    proc, info = spawn("kvpool", ["up", "--port", "0", "--data-dir", str(tmp / "data")],
                       {**base, **(env or {})}, tmp / "up.log")
    return Up(proc, info["master"], info["daemon"])


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    pool = start_up(tmp_path_factory.mktemp("up"))
    try:
        yield pool
    finally:
        stop(pool.proc)


def tokens(ns: Namespace, n: int, tag: int) -> list[int]:
    return [tag * 1000 + i for i in range(n * ns.block_tokens)]


def payload(i: int) -> np.ndarray:
    return np.full(BLOCK, i % 251, dtype=np.uint8)


async def put_chain(pool: Up, ns: Namespace, n: int, tag: int, token_ids: bool = False) -> list[bytes]:
    toks = tokens(ns, n, tag)
    keys = block_keys(ns, toks)
    per_key = [toks[i * ns.block_tokens:(i + 1) * ns.block_tokens] for i in range(n)]
    async with pool.client() as c:
        await c.batch_put(keys, [payload(i) for i in range(n)], chained=True, namespace=ns,
                          token_ids=per_key if token_ids else None)
    return keys


async def put_apart(pool: Up, ns: Namespace, n: int, tag: int) -> list[bytes]:
    """``n`` blocks in one put, none chained to another: one BlockStored each."""
    keys = block_keys(ns, tokens(ns, n, tag))
    async with pool.client() as c:
        await c.batch_put(keys, [payload(i) for i in range(n)], namespace=ns)
    return keys


class Stream:
    """One SSE connection, read event by event."""

    def __init__(self, resp: aiohttp.ClientResponse) -> None:
        self.resp = resp

    async def next(self, timeout: float = 10.0) -> tuple[str | None, dict[str, Any]]:
        async def read() -> tuple[str | None, dict[str, Any]]:
            ident, data = None, []
            while True:
                line = (await self.resp.content.readline()).decode().rstrip("\n")
                if line.startswith("id: "):
                    ident = line[4:]
                elif line.startswith("data: "):
                    data.append(line[6:])
                elif not line and data:
                    return ident, json.loads("\n".join(data))
        return await asyncio.wait_for(read(), timeout)

    async def take(self, n: int) -> list[dict[str, Any]]:
        return [(await self.next())[1] for _ in range(n)]


async def stream(pool: Up, last_id: int | None = None) -> AsyncIterator[Stream]:
    headers = {"Last-Event-ID": str(last_id)} if last_id is not None else {}
    async with aiohttp.ClientSession() as session:
        async with session.get(pool.master + "/v1/events", headers=headers) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
            yield Stream(resp)


def last_id(pool: Up) -> int:
    return admin(pool.master, "/v1/stats?recent=0")[1]["events"]["last_id"]


async def test_events_arrive_in_order_in_vllm_schema_and_resume_from_the_last_id(up: Up) -> None:
    async for s in stream(up):
        keys = await put_chain(up, NS_A, 3, tag=1, token_ids=True)
        (chain,) = await s.take(1)
        head = await put_chain(up, NS_A, 1, tag=1)  # a block its chain already holds: no event
        more = await put_chain(up, NS_A, 4, tag=1, token_ids=True)  # the chain goes on
        (tail,) = await s.take(1)
    # A put's chain is one BlockStored, as vLLM's: its hashes in order, the parent of the
    # first, the tokens of all of them.
    assert chain["type"] == tail["type"] == "BlockStored"
    assert chain["block_hashes"] == [k.hex() for k in keys] and head == keys[:1]
    assert (chain["parent_block_hash"], chain["medium"], chain["node"], chain["block_size"],
            chain["reason"]) == (None, "host", "node0", 4, "put")
    assert chain["token_ids"] == tokens(NS_A, 3, 1)
    assert tail["block_hashes"] == [more[3].hex()] and tail["parent_block_hash"] == keys[2].hex()
    assert tail["token_ids"] == tokens(NS_A, 4, 1)[12:16]
    ids = [chain["id"], tail["id"]]
    assert ids == sorted(ids) and len(set(ids)) == 2

    # Disconnected: two removals happen; a reconnect from the last id seen gets exactly them.
    async with up.client() as c:
        await c.remove(keys[2])
        await c.remove(keys[1])
    async for s in stream(up, last_id=ids[-1]):
        ident, first = await s.next()
        _, second = await s.next()
    assert (first["type"], first["block_hashes"], first["reason"]) == \
        ("BlockRemoved", [keys[2].hex()], "removed")
    assert second["block_hashes"] == [keys[1].hex()] and int(ident) == first["id"] == ids[-1] + 1
    # Blocks written without token ids never carry them (prompt content is opt-in).
    async for s in stream(up):
        await put_chain(up, NS_A, 1, tag=2)
        (plain,) = await s.take(1)
    assert "token_ids" not in plain


async def test_a_subscriber_that_fell_behind_the_ring_is_told_it_lagged(up: Up) -> None:
    before = last_id(up)
    keys = await put_apart(up, NS_B, RING + 10, tag=3)  # more events than the ring keeps
    after = last_id(up)
    assert after - before >= RING + 10
    async for s in stream(up, last_id=before):
        ident, lost = await s.next()
        rest = await s.take(RING)
    assert lost["type"] == "EventsLost"
    assert lost["missed"] == after - before - RING and lost["after"] == before
    assert int(ident) == lost["resume_from"] - 1
    assert [e["id"] for e in rest] == list(range(lost["resume_from"], lost["resume_from"] + RING))
    assert rest[-1]["block_hashes"] == [keys[-1].hex()]
    # An id no master issued (here: from the future) is a gap of unknown size, also told.
    async for s in stream(up, last_id=after + 10**9):
        _, unknown = await s.next()
    assert unknown["type"] == "EventsLost" and unknown["missed"] is None


def kvpool_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvpool", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


async def test_the_events_verb_follows_the_stream_from_an_id(up: Up) -> None:
    start = last_id(up)
    keys = await put_apart(up, NS_A, 2, tag=4)
    res = await asyncio.to_thread(kvpool_cli, "events", "--master", up.master, "--from", str(start),
                                  "--count", "2", "--json")
    assert res.returncode == 0, res.stderr
    got = [json.loads(line) for line in res.stdout.splitlines()]
    assert [e["block_hashes"] for e in got] == [[k.hex()] for k in keys]
    table = await asyncio.to_thread(kvpool_cli, "events", "--master", up.master, "--from",
                                    str(start), "--count", "1")
    assert "BlockStored" in table.stdout and keys[0].hex() in table.stdout
    top = await asyncio.to_thread(kvpool_cli, "top", "--master", up.master, "-n", "2",
                                  "--interval", "0.2")
    assert top.returncode == 0 and "prefix hit rate" in top.stdout and "puts/s" in top.stdout, top.stderr
    refused = await asyncio.to_thread(kvpool_cli, "events", "--master", "http://127.0.0.1:9",
                                      "--count", "1", timeout=5)
    assert refused.returncode == 2 and "cannot reach the master" in refused.stderr


def scrape(url: str) -> dict[str, float]:
    """Every sample of a /metrics page: 'name{labels}' -> value."""
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


def value(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sum of a metric's samples whose labels include ``labels``."""
    total = 0.0
    for series, v in samples.items():
        base, _, rest = series.partition("{")
        if base == name and all(f'{k}="{val}"' in rest for k, val in labels.items()):
            total += v
    return total


async def exercise(pool: Up, tag: int) -> list[bytes]:
    """Puts, gets that hit and miss, matches that hit and miss, and demotions."""
    keys = await put_chain(pool, NS_A, 6, tag=tag)
    missing = block_keys(NS_A, tokens(NS_A, 2, tag + 500))
    async with pool.client() as c:
        outs = [np.empty(BLOCK, np.uint8) for _ in range(3)]
        await c.batch_get(keys[:2] + missing[:1], outs)
        assert await c.match_prefix(keys[:4] + missing) == 4
        await asyncio.sleep(0.2)  # the get's lease is released on its own, then nothing holds them
        status, _ = await asyncio.to_thread(admin, pool.master, "/v1/evict", "POST",
                                            {"tier": "host", "fill": 0.0})
        assert status == 200
        await c.batch_get(keys[:1], outs[:1])  # promotes from SSD
    return keys


async def test_counters_and_histograms_move_with_the_operations(up: Up) -> None:
    m0, d0 = scrape(up.master), scrape(up.daemon)
    await exercise(up, tag=10)
    m1, d1 = scrape(up.master), scrape(up.daemon)

    def delta(name: str, **labels: str) -> float:
        return value(m1, name, **labels) - value(m0, name, **labels)

    assert delta("kvpool_put_blocks_total", phase="committed") == 6
    assert delta("kvpool_get_blocks_total", result="hit") == 3
    assert delta("kvpool_get_blocks_total", result="miss") == 1
    assert delta("kvpool_match_blocks_total", result="hit") == 4
    assert delta("kvpool_match_blocks_total", result="miss") == 2
    assert delta("kvpool_master_call_seconds_count", call="reserve") == 1
    assert delta("kvpool_master_call_seconds_count", call="get") == 2
    assert delta("kvpool_master_call_seconds_count", call="match") == 1
    assert delta("kvpool_demotions_total", tier="host") >= 6
    assert delta("kvpool_promotions_total") == 1
    assert delta("kvpool_get_hits_by_tier_total", tier="ssd") == 1
    assert 0 < value(m1, "kvpool_prefix_hit_ratio") < 1
    # The daemon moved the bytes: its histogram and byte counter say so.
    moved = value(d1, "kvpool_daemon_copy_seconds_count", src="host", dst="ssd") - \
        value(d0, "kvpool_daemon_copy_seconds_count", src="host", dst="ssd")
    assert moved >= 6
    assert value(d1, "kvpool_daemon_copy_bytes_total", src="ssd", dst="host") - \
        value(d0, "kvpool_daemon_copy_bytes_total", src="ssd", dst="host") == BLOCK
    # Gauges agree with the admin API.
    nodes = admin(up.master, "/v1/nodes")[1]["nodes"]
    for tier in nodes[0]["tiers"]:
        assert value(m1, "kvpool_tier_blocks", node="node0", tier=tier["kind"]) == tier["blocks"]
        assert value(m1, "kvpool_tier_capacity_bytes", node="node0", tier=tier["kind"]) == tier["capacity"]
    assert value(m1, "kvpool_nodes") == 1 and value(m1, "kvpool_leader") == 1
    assert value(m1, "kvpool_blocks") == admin(up.master, "/v1/cluster")[1]["blocks"]
    assert value(d1, "kvpool_daemon_tier_blocks", tier="ssd") >= 6
    # The server froze what outlived its full collections (kvpool.heap).
    assert value(m1, "kvpool_gc_full_collections_total") >= 1
    assert value(m1, "kvpool_gc_frozen_objects") > 10_000


def dashboard_series() -> set[str]:
    dash = json.loads((ROOT / "configs" / "grafana-dashboard.json").read_text())
    names = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            names |= {n for n in re.findall(r"\b(kvpool_[a-z0-9_]+)", target["expr"])}
    return names


async def test_every_series_the_dashboard_queries_exists(up: Up) -> None:
    await exercise(up, tag=20)
    have = {s.partition("{")[0] for s in list(scrape(up.master)) + list(scrape(up.daemon))}
    wanted = dashboard_series()
    assert len(wanted) > 25
    assert wanted <= have, f"the dashboard queries series no pool serves: {sorted(wanted - have)}"
    scrape_cfg = (ROOT / "configs" / "prometheus.yml").read_text()
    assert "job_name: kvpool-master" in scrape_cfg and "job_name: kvpool-daemon" in scrape_cfg


async def test_purge_a_model_from_every_tier_then_everything(up: Up) -> None:
    a = await put_chain(up, NS_A, 4, tag=30)
    b = await put_chain(up, NS_B, 3, tag=31)
    # Half of model A's blocks move down to SSD first: the purge finds them there too.
    assert admin(up.master, "/v1/evict", "POST", {"tier": "host", "fill": 0.0})[0] == 200
    start = last_id(up)
    res = await asyncio.to_thread(kvpool_cli, "purge", "--master", up.master, "--model", "model-a",
                                  "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["purged"] >= 4
    async with up.client() as c:
        assert await c.batch_exists(a) == [False] * 4
        assert await c.batch_exists(b) == [True] * 3
    async for s in stream(up, last_id=start):
        removed = [await s.next() for _ in range(4)]
    assert all(e["type"] == "BlockRemoved" and e["reason"] == "purged" for _, e in removed)
    # A namespace given by its fields purges model B's blocks.
    res = await asyncio.to_thread(kvpool_cli, "purge", "--master", up.master, "--namespace",
                                  "model-b:float16:test-layout:0:1:4")
    assert res.returncode == 0 and re.match(r"purged \d+ blocks", res.stdout), res.stderr
    async with up.client() as c:
        assert await c.batch_exists(b) == [False] * 3
    await put_chain(up, NS_B, 2, tag=32)
    refused = await asyncio.to_thread(kvpool_cli, "purge", "--master", up.master, "--all")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    start = last_id(up)
    res = await asyncio.to_thread(kvpool_cli, "purge", "--master", up.master, "--all", "--yes")
    assert res.returncode == 0, res.stderr
    assert admin(up.master, "/v1/cluster")[1]["blocks"] == 0
    async for s in stream(up, last_id=start):
        _, cleared = await s.next()
    assert cleared["type"] == "AllBlocksCleared"
    assert admin(up.master, "/v1/purge", "POST", {"models": ["x"], "all": True})[0] == 400
    assert admin(up.master, "/v1/purge", "POST", {"nothing": 1})[0] == 400
    wait_for(lambda: scrape(up.daemon).get('kvpool_daemon_tier_blocks{node="node0",tier="ssd"}') == 0,
             10, "the daemon to forget the purged SSD blocks")


async def test_pin_evict_and_unpin_verbs(up: Up) -> None:
    keys = await put_chain(up, NS_B, 3, tag=40)
    pinned = keys[2].hex()  # the chain's leaf: the first an eviction would take
    res = await asyncio.to_thread(kvpool_cli, "pin", "--master", up.master, pinned)
    assert res.returncode == 0 and f"pinned {pinned}" in res.stdout, res.stderr
    assert admin(up.master, f"/v1/blocks/{pinned}")[1]["pins"] == 1
    res = await asyncio.to_thread(kvpool_cli, "evict", "--master", up.master, "--tier", "host",
                                  "--fill", "0")
    assert res.returncode == 0 and "host: demoted" in res.stdout, res.stderr

    def tiers(key: bytes) -> set[str]:
        return {r["tier"] for r in admin(up.master, f"/v1/blocks/{key.hex()}")[1]["replicas"]}

    assert tiers(keys[2]) == {"host"}  # pinned: stays in the fast tier
    assert "host" not in tiers(keys[0])
    res = await asyncio.to_thread(kvpool_cli, "unpin", "--master", up.master, pinned)
    assert res.returncode == 0 and admin(up.master, f"/v1/blocks/{pinned}")[1]["pins"] == 0
    bad = await asyncio.to_thread(kvpool_cli, "pin", "--master", up.master, "nothex")
    assert bad.returncode == 2 and "32 hex characters" in bad.stderr
    bad = await asyncio.to_thread(kvpool_cli, "evict", "--master", up.master, "--fill", "7")
    assert bad.returncode == 2 and "outside" in bad.stderr
