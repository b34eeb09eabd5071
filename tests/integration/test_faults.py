"""Fault injection under a running load, with real processes in cluster mode (a 3-member
etcd, two masters, three daemons): SIGKILL and SIGSTOP of a client, a daemon, the leader
and an etcd member. Each test runs a small closed-loop load (puts with ``replicas=2``,
gets verified byte for byte) through the fault and its recovery, then asserts: 0 wrong
bytes, only typed errors, every block committed before or during the fault still
readable (each had a surviving copy), and the leader's check passing."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import pytest

from clients.client import AsyncPoolClient
from scripts.loadgen import Load
from tests.integration.cluster import TTL, Cluster, make_cluster
from kvpool.launcher import free_port
from tests.conftest import AWS_ENV, start_moto, stop_proc
from tests.integration.conftest import ROOT, Pool, make_pool

BLOCK = 64 << 10


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    c = make_cluster(tmp_path_factory.mktemp("faults"), masters=2, daemons=3, etcd_members=3)
    try:
        yield c
        c.check()
    finally:
        c.stop()


async def under_load(cluster: Cluster, fault: "asyncio.Future | object", settle_s: float = 1.0,
                     timeout_s: float = 20.0) -> Load:
    async with AsyncPoolClient(cluster.client_config(timeout_s=timeout_s)) as client:
        load = Load(client, block=BLOCK, batch=2, replicas=2, pause_s=0.02)
        task = asyncio.create_task(load.run())
        await asyncio.sleep(0.8)
        await fault  # type: ignore[misc]
        await asyncio.sleep(settle_s)
        load.stop()
        await task
        seen = load.now
        assert seen.wrong == 0, "a get returned wrong bytes"
        assert not seen.untyped, seen.untyped
        assert seen.calls > 10
        lost, wrong = await load.verify()  # every block stored had two copies
        why = {code: sum(1 for i in lost if load.why.get(i) == code) for code in set(load.why.values())}
        assert not lost, (f"{len(lost)} of {len(seen.stored)} blocks with a surviving copy are "
                          f"gone ({why}; the cluster's logs are under {cluster.root})")
        assert wrong == 0
    cluster.check()
    return load


def signal_proc(cluster: Cluster, name: str, sig: int) -> None:
    cluster.procs[name].popen.send_signal(sig)


async def pause(cluster: Cluster, name: str, seconds: float) -> None:
    signal_proc(cluster, name, signal.SIGSTOP)
    try:
        await asyncio.sleep(seconds)
    finally:
        signal_proc(cluster, name, signal.SIGCONT)


async def test_a_daemon_stopped_mid_transfer_costs_only_deadlines(cluster: Cluster) -> None:
    """A daemon that stops answering (its transfers never complete) shorter than its
    lease: calls touching it end at their deadline with a typed error, then all resumes."""
    load = await under_load(cluster, pause(cluster, "node1", TTL * 0.6), timeout_s=2.0)
    # Bounded by deadlines, not by the stop: a few 2 s deadlines in a row, with room for
    # a loaded 2-core CI machine (a call that hung on the stopped daemon would wait 20 s).
    assert load.now.longest_s < 2.0 * 3 + 6.0, f"a call waited {load.now.longest_s:.1f}s"


async def test_a_daemon_stopped_past_its_lease_comes_back_and_loses_nothing(cluster: Cluster) -> None:
    """One of three daemons frozen longer than its membership TTL: the leader drops it
    and copies its blocks again from the survivors, the calls in flight to it end at
    their deadlines; thawed, it joins again with its inventory, and what it was asked to
    do meanwhile lands on nobody else's blocks. Every block committed before, during and
    after reads back byte for byte."""
    await under_load(cluster, pause(cluster, "node1", TTL + 2.5), settle_s=2.0, timeout_s=5.0)
    await asyncio.to_thread(cluster.wait_nodes, {"node0", "node1", "node2"})


async def test_a_daemon_killed_under_load_loses_no_block_with_a_copy(cluster: Cluster) -> None:
    async def kill() -> None:
        await asyncio.to_thread(cluster.kill, "node2", signal.SIGKILL)
        await asyncio.to_thread(cluster.wait_nodes, {"node0", "node1"}, TTL + 5)

    await under_load(cluster, kill())
    cluster.start_daemon("node2")
    await asyncio.to_thread(cluster.wait_nodes, {"node0", "node1", "node2"})


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL], ids=["stop", "kill"])
async def test_the_leader_stopped_or_killed_under_load(cluster: Cluster, sig: int) -> None:
    old = cluster.wait_leader_name()

    async def fault() -> None:
        if sig == signal.SIGKILL:
            await asyncio.to_thread(cluster.kill, old, sig)
        else:  # frozen past its lease: a standby leads; thawed, it steps down
            signal_proc(cluster, old, signal.SIGSTOP)
        for _ in range(int((TTL + 8) / 0.1)):
            name = cluster.leader_name()
            if name not in (None, old):
                break
            await asyncio.sleep(0.1)
        if sig == signal.SIGSTOP:
            signal_proc(cluster, old, signal.SIGCONT)
        assert cluster.wait_leader_name(5) != old

    await under_load(cluster, fault(), settle_s=1.5)
    if not cluster.running(old):
        cluster.start_master(old)


async def test_clients_stopped_or_killed_mid_load_leave_nothing_behind(cluster: Cluster) -> None:
    """Client processes putting in a loop, one frozen past the put timeout and thawed,
    one killed: their reservations are reclaimed, the thawed one sees typed errors only."""
    script = (
        "import asyncio, os, sys, numpy as np\n"
        "from clients.client import AsyncPoolClient\nfrom kvpool.config import ClientConfig\n"
        "from kvpool.errors import KVPoolError\n"
        f"cfg = ClientConfig(etcd={cluster.etcd_endpoint!r}, cluster={cluster.cluster!r}, timeout_s=5)\n"
        "async def main():\n"
        "    async with AsyncPoolClient(cfg) as c:\n"
        "        for i in range(10**6):\n"
        "            try:\n"
        f"                await c.batch_put([os.urandom(16) for _ in range(4)], [np.ones({BLOCK}, np.uint8)] * 4)\n"
        "                print('ok', flush=True)\n"
        "            except KVPoolError as e:\n"
        "                print('typed', e.code, flush=True)\n"
        "asyncio.run(main())\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]

    async def fault() -> None:
        for p in procs:  # each is putting before the faults
            first = await asyncio.wait_for(asyncio.to_thread(p.stdout.readline), 60)  # type: ignore[union-attr]
            assert first.split()[:1] in (["ok"], ["typed"]), first
        procs[0].send_signal(signal.SIGSTOP)
        procs[1].send_signal(signal.SIGKILL)
        await asyncio.sleep(4.0)  # past the put timeout (3 s in these tests): reclaimed
        procs[0].send_signal(signal.SIGCONT)
        await asyncio.sleep(2.0)
        procs[0].send_signal(signal.SIGTERM)

    try:
        await under_load(cluster, fault())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    out, err = procs[0].communicate(timeout=10)
    lines = [line.split()[0] for line in out.splitlines() if line.strip()]
    assert set(lines) <= {"ok", "typed"} and "ok" in lines, (out[-500:], err[-2000:])


@pytest.mark.parametrize("sig", [signal.SIGSTOP, signal.SIGKILL], ids=["stop", "kill"])
async def test_an_etcd_member_stopped_or_killed_under_load(cluster: Cluster, sig: int) -> None:
    """One of three etcd members: the other two keep a quorum. A stopped raft leader that
    resumes revokes every lease in etcd before 3.4.28 (etcd-io/etcd#15247), so daemons and
    the leading master may lose theirs early and join again, while the master deposed
    that way still believes it leads: the daemons fence its calls off, and no block with
    a copy is lost."""
    if sig == signal.SIGSTOP:
        await under_load(cluster, pause(cluster, "etcd2", TTL * 2))
    else:  # the last test of the module: the member stays dead
        await under_load(cluster, asyncio.to_thread(cluster.kill, "etcd1", signal.SIGKILL),
                         settle_s=TTL + 1.0)


# -- a disk that fills, an object store that stalls or errors: one master and one daemon ----

SMALL = {"KVPOOL_DAEMON_HOST_BYTES": "4MiB", "KVPOOL_DAEMON_IO_THREADS": "2"}
TYPED_FAULT = {"no_space", "unavailable", "transfer_failed", "node_gone", "reservation_lost"}


def ops(url: str) -> dict[str, int]:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        return {line.split('"')[1]: int(float(line.rsplit(" ", 1)[1]))
                for line in resp.read().decode().splitlines() if line.startswith("kvpool_ops_total")}


async def phases(pool: Pool, fault, recover, before_s: float = 2.5,  # type: ignore[no-untyped-def]
                 during_s: float = 3.0, after_s: float = 2.5) -> Load:
    """A light load (64 KiB blocks: nothing is evicted) through phases "before", "fault"
    (``fault`` then ``during_s``), "after" (``recover`` then ``after_s``)."""
    async with AsyncPoolClient(pool.client_config(timeout_s=5.0)) as client:
        load = Load(client, block=BLOCK, batch=2, pause_s=0.03, noise=True, phase="before")
        task = asyncio.create_task(load.run())
        try:
            await asyncio.sleep(before_s)
            load.phase = "fault"
            await asyncio.to_thread(fault)
            await asyncio.sleep(during_s)
            load.phase = "after"
            await asyncio.to_thread(recover)
            await asyncio.sleep(after_s)
        finally:
            load.stop()
            await task
        for name, seen in load.phases.items():
            assert not seen.untyped, (name, seen.untyped)
            assert seen.wrong == 0, f"{name}: a get returned wrong bytes"
            assert set(seen.errors) <= TYPED_FAULT, (name, seen.errors, seen.messages)
        assert not load.phases["before"].errors, load.phases["before"].errors
        assert load.phases["after"].stored, "no put succeeded after the recovery"
        return load


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A small file system of its own, to fill (mounting one needs root)."""
    if os.geteuid() != 0 or shutil.which("fallocate") is None:
        pytest.skip("needs root (to mount a tmpfs) and fallocate")
    path = tmp_path / "node0"
    path.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96m", "tmpfs", str(path)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


async def test_a_disk_that_fills_refuses_puts_typed_and_loses_nothing(tmp_path: Path, tmpfs: Path) -> None:
    """The SSD tier's disk fills while blocks are demoted into it: demotions fail with
    TierFull and leave the blocks where they are, puts get TierFull once the host arena is
    full too; nothing stored is lost; once space is back, demotion and puts resume."""
    pool = make_pool(tmp_path, daemon_env={**SMALL, "KVPOOL_DAEMON_SSD_BYTES": "64MiB",
                                           "KVPOOL_DAEMON_OBJECT_BYTES": "0"})
    filler = tmpfs / "filler"
    try:
        def fill() -> None:  # to the last pages (what is free moves while the daemon writes)
            for slack in (64 << 10, 1 << 20, 4 << 20):
                size = shutil.disk_usage(tmpfs).free - slack
                if subprocess.run(["fallocate", "-l", str(size), str(filler)],
                                  capture_output=True).returncode == 0:
                    break
            subprocess.run(["fallocate", "-l", str(max(4096, shutil.disk_usage(tmpfs).free - 4096)),
                            str(tmpfs / "filler2")], capture_output=True)

        def free() -> None:
            filler.unlink()
            (tmpfs / "filler2").unlink(missing_ok=True)

        before = ops(pool.master_url)
        load = await phases(pool, fill, free)
        after = ops(pool.master_url)
        failed = after.get("move_failed_ssd", 0) - before.get("move_failed_ssd", 0)
        seen = load.phases.get("fault")
        assert failed or (seen is not None and seen.errors.get("no_space")), "the full disk went unnoticed"
        assert after.get("demoted_host", 0) > before.get("demoted_host", 0)
        async with AsyncPoolClient(pool.client_config()) as client:
            load.client = client
            lost, wrong = await load.verify()
        assert not lost and wrong == 0, f"{len(lost)} blocks lost, {wrong} wrong"
        pool.check()
    finally:
        pool.stop()


@pytest.mark.parametrize("fault", ["stall", "error"])
async def test_an_object_store_that_stalls_or_errors(tmp_path: Path, fault: str) -> None:
    """The object tier's S3 service freezes (SIGSTOP) or dies and comes back empty: the
    hot tiers keep serving, the errors are typed, no byte is wrong; after SIGCONT (or the
    restart) demotion into the store resumes. A freeze loses nothing."""
    port, log = free_port(), (tmp_path / "moto.log").open("wb")
    moto = start_moto(port, log)
    bucket = f"kvpool-{fault}"
    pool = make_pool(tmp_path, daemon_env={
        **SMALL, "KVPOOL_DAEMON_SSD_BYTES": "8MiB", "KVPOOL_DAEMON_OBJECT_BYTES": "256MiB",
        "KVPOOL_DAEMON_OBJECT_URL": f"s3://{bucket}/blocks",
        "KVPOOL_DAEMON_S3_ENDPOINT": f"http://127.0.0.1:{port}", **AWS_ENV})
    try:
        def inject() -> None:
            moto.send_signal(signal.SIGSTOP if fault == "stall" else signal.SIGKILL)

        def recover() -> None:
            nonlocal moto
            if fault == "stall":
                moto.send_signal(signal.SIGCONT)
                return
            moto.wait()
            moto = start_moto(port, log)
            import boto3  # the store is back, empty: its operator recreates the bucket
            boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1",
                         aws_access_key_id="testing", aws_secret_access_key="testing"
                         ).create_bucket(Bucket=bucket)

        def demoted() -> int:
            return ops(pool.master_url).get("demoted_ssd", 0)

        load = await phases(pool, inject, recover, before_s=4.0)
        # One closed loop: a get of a block only the frozen store holds may hold it for the
        # whole fault; the hot tiers must serve during it or at once after it.
        during = load.phases.get("fault")
        assert (during is not None and during.stored) or load.phases["after"].stored
        at = demoted()
        async with AsyncPoolClient(pool.client_config()) as client:
            load.client = client
            load.phase = "again"
            load._stop.clear()
            for _ in range(4):  # a loaded machine may take a few rounds to demote again
                await load.run(until=time.time() + 3.0)
                if demoted() > at:
                    break
            assert not load.now.errors and not load.now.untyped, load.now
            assert demoted() > at, "no block reached the object store after it recovered"
            lost, wrong = await load.verify(None if fault == "stall" else load.now.stored)
        assert not lost and wrong == 0, f"{len(lost)} blocks lost, {wrong} wrong"
        pool.check()
    finally:
        pool.stop()
        if moto.poll() is None:
            moto.send_signal(signal.SIGCONT)
            stop_proc(moto)
        log.close()
