"""A cluster of real processes on 127.0.0.1 for the tests: `kvpool.launcher.LocalCluster`
(etcd, masters and daemons through the CLI, each on free ports with its own data folder,
stopped by their own pids) with short leases and the test's helpers."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kvpool.launcher import LocalCluster
from kvpool.config import ClientConfig
from tests.integration.conftest import master_check

TTL = 2.0  # leader and membership leases in these tests (etcd counts whole seconds)
MASTER_ENV = {"KVPOOL_MASTER_PUT_TIMEOUT_S": "3", "KVPOOL_MASTER_SWEEP_INTERVAL_S": "0.2",
              "KVPOOL_MASTER_READ_LEASE_S": "30"}
DAEMON_ENV = {"KVPOOL_DAEMON_HOST_BYTES": "64MiB", "KVPOOL_DAEMON_SSD_BYTES": "128MiB",
              "KVPOOL_DAEMON_OBJECT_BYTES": "256MiB", "KVPOOL_DAEMON_IO_THREADS": "2"}


@dataclass
class Cluster(LocalCluster):
    def url(self, name: str) -> str:
        return self.procs[name].url

    def leader_name(self) -> str | None:
        leader = self.leader()
        return leader.name if leader is not None else None

    def wait_leader_name(self, timeout_s: float = 20.0) -> str:
        return self.wait_leader(timeout_s).name

    def running(self, name: str) -> bool:
        return name in self.procs

    def client_config(self, **overrides: Any) -> ClientConfig:
        return ClientConfig(**{"etcd": self.etcd_endpoint, "cluster": self.cluster,
                               "timeout_s": 20.0, **overrides})

    def check(self) -> dict:
        """The leader's invariants: index, allocators and every daemon's inventory agree."""
        return master_check(self.wait_leader().url)


def make_cluster(tmp: Path, masters: int = 1, daemons: int = 1, s3_endpoint: str = "",
                 etcd_members: int = 1, master_env: dict[str, str] | None = None,
                 daemon_env: dict[str, str] | None = None) -> Cluster:
    """etcd (of ``etcd_members`` members), masters m0.. and daemons node0..; with
    ``s3_endpoint`` the daemons share one object tier, a bucket on that S3 endpoint;
    ``master_env``/``daemon_env`` override the tests' settings."""
    if shutil.which("etcd") is None:
        pytest.skip("needs an etcd server binary: apt-get install etcd-server")
    shared = {"KVPOOL_DAEMON_OBJECT_URL": f"s3://kvpool-{tmp.name.lower()}/blocks",
              "KVPOOL_DAEMON_S3_ENDPOINT": s3_endpoint} if s3_endpoint else {}
    c = Cluster(tmp, cluster="it", ttl_s=TTL, master_env={**MASTER_ENV, **(master_env or {})},
                daemon_env={**DAEMON_ENV, **shared, **(daemon_env or {})}, etcd_members=etcd_members)
    try:
        c.start_etcd()
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
