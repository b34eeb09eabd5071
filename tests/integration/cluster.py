"""A cluster of real processes on 127.0.0.1: one etcd server (stoppable and restartable on
the same data folder and port), masters and daemons started through the CLI with
``--etcd``, each with its own ports and data folder, stopped by their own pids."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvpool.config import ClientConfig
from tests.conftest import free_port
from tests.integration.conftest import admin, spawn, stop, wait_for

TTL = 2.0  # leader and membership leases in these tests (etcd counts whole seconds)
MASTER_ENV = {"KVPOOL_MASTER_PUT_TIMEOUT_S": "3", "KVPOOL_MASTER_SWEEP_INTERVAL_S": "0.2",
              "KVPOOL_MASTER_READ_LEASE_S": "30", "KVPOOL_MASTER_LEADER_TTL_S": str(TTL)}
DAEMON_ENV = {"KVPOOL_DAEMON_HOST_BYTES": "64MiB", "KVPOOL_DAEMON_SSD_BYTES": "128MiB",
              "KVPOOL_DAEMON_OBJECT_BYTES": "256MiB", "KVPOOL_DAEMON_NODE_TTL_S": str(TTL),
              "KVPOOL_DAEMON_IO_THREADS": "2"}


class Etcd:
    """A real etcd server; ``stop`` and ``start`` again keep its data folder and port."""

    def __init__(self, data: Path) -> None:
        binary = shutil.which("etcd")
        if binary is None:
            import pytest

            pytest.skip("needs an etcd server binary: apt-get install etcd-server")
        self.binary, self.data = binary, data
        self.port, self.peer = free_port(), free_port()
        self.proc: subprocess.Popen | None = None
        self.endpoint = f"127.0.0.1:{self.port}"

    def start(self) -> None:
        log = (self.data.parent / f"{self.data.name}.log").open("ab")
        self.proc = subprocess.Popen([
            self.binary, "--name", "kvpool-it", "--data-dir", str(self.data),
            "--listen-client-urls", f"http://{self.endpoint}",
            "--advertise-client-urls", f"http://{self.endpoint}",
            "--listen-peer-urls", f"http://127.0.0.1:{self.peer}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{self.peer}",
            "--initial-cluster", f"kvpool-it=http://127.0.0.1:{self.peer}"],
            stdout=log, stderr=subprocess.STDOUT)

        def healthy() -> bool:
            try:
                with urllib.request.urlopen(f"http://{self.endpoint}/health", timeout=1) as resp:
                    return b"true" in resp.read()
            except OSError:
                return False

        wait_for(healthy, 30, "etcd to become healthy")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None:
            stop(self.proc, sig)
            self.proc = None


@dataclass
class Cluster:
    tmp: Path
    etcd: Etcd
    cluster: str = "it"
    daemon_env: dict[str, str] = field(default_factory=dict)  # for every daemon
    masters: dict[str, tuple[subprocess.Popen, str]] = field(default_factory=dict)
    daemons: dict[str, tuple[subprocess.Popen, str]] = field(default_factory=dict)

    def start_master(self, name: str, env: dict[str, str] | None = None) -> str:
        proc, info = spawn(["master", "--port", "0", "--etcd", self.etcd.endpoint,
                            "--cluster", self.cluster], {**MASTER_ENV, **(env or {})},
                           self.tmp / f"{name}.log")
        self.masters[name] = (proc, info["master"])
        return info["master"]

    def start_daemon(self, node_id: str, env: dict[str, str] | None = None) -> str:
        proc, info = spawn(["daemon", "--etcd", self.etcd.endpoint, "--cluster", self.cluster,
                            "--node-id", node_id, "--data-dir", str(self.tmp / node_id)],
                           {**DAEMON_ENV, **self.daemon_env, **(env or {})},
                           self.tmp / f"{node_id}.log")
        self.daemons[node_id] = (proc, info["daemon"])
        return info["daemon"]

    def kill_master(self, name: str, sig: int = signal.SIGKILL) -> None:
        stop(self.masters.pop(name)[0], sig)

    def kill_daemon(self, node_id: str, sig: int = signal.SIGKILL) -> None:
        stop(self.daemons.pop(node_id)[0], sig)

    def leader(self) -> str | None:
        """The name of the master that is leader and ready, if one is."""
        for name, (_, url) in self.masters.items():
            try:
                status, body = admin(url, "/readyz")
            except OSError:
                continue
            if status == 200 and body.get("ready"):
                return name
        return None

    def wait_leader(self, timeout: float = 20.0) -> str:
        wait_for(lambda: self.leader() is not None, timeout, "a ready leader")
        return self.leader()  # type: ignore[return-value]

    def url(self, name: str) -> str:
        return self.masters[name][1]

    def nodes(self) -> set[str]:
        leader = self.leader()
        if leader is None:
            return set()
        return {n["node_id"] for n in admin(self.url(leader), "/v1/nodes")[1]["nodes"]}

    def wait_nodes(self, expected: set[str], timeout: float = 20.0) -> None:
        wait_for(lambda: self.nodes() == expected, timeout, f"the leader to list nodes {expected}")

    def client_config(self, **overrides: Any) -> ClientConfig:
        return ClientConfig(etcd=self.etcd.endpoint, cluster=self.cluster, timeout_s=20.0,
                            **overrides)

    def check(self) -> dict:
        """The leader's invariants: index, allocators and every daemon's inventory agree."""
        from kvpool.wire import RpcClient

        url = self.url(self.wait_leader())

        async def run() -> dict:
            rpc = RpcClient(url)
            try:
                return await rpc.call("check")
            finally:
                await rpc.close()

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, run()).result()

    def stop(self) -> None:
        for node_id in list(self.daemons):
            self.kill_daemon(node_id, signal.SIGTERM)
        for name in list(self.masters):
            self.kill_master(name, signal.SIGTERM)
        self.etcd.stop()


def make_cluster(tmp: Path, masters: int = 1, daemons: int = 1, s3_endpoint: str = "") -> Cluster:
    """etcd, masters and daemons; with ``s3_endpoint`` the daemons share one object tier,
    a bucket on that S3 endpoint."""
    etcd = Etcd(tmp / "etcd")
    etcd.start()
    shared = {"KVPOOL_DAEMON_OBJECT_URL": f"s3://kvpool-{tmp.name.lower()}/blocks",
              "KVPOOL_DAEMON_S3_ENDPOINT": s3_endpoint} if s3_endpoint else {}
    c = Cluster(tmp, etcd, daemon_env=shared)
    try:
        for i in range(masters):
            c.start_master(f"m{i}")
        c.wait_leader()
        for i in range(daemons):
            c.start_daemon(f"node{i}")
        c.wait_nodes({f"node{i}" for i in range(daemons)})
    except BaseException:
        c.stop()
        raise
    return c


def gone_within(deadline_s: float, predicate: Any) -> float:
    """Seconds until ``predicate`` holds, or AssertionError after ``deadline_s``."""
    start = time.monotonic()
    wait_for(predicate, deadline_s, "the cluster to settle")
    return time.monotonic() - start
