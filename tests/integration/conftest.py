"""Real processes on 127.0.0.1: a master and pool daemons started through the CLI, each on
free ports with its own data folder, and stopped by their own process ids."""

from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
import signal
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import pytest

from kvpool.launcher import spawn, stop
from kvpool.config import ClientConfig
from kvpool.wire import RpcClient

ROOT = Path(__file__).resolve().parents[2]


def master_check(url: str) -> dict:
    """The master's ``check`` (index, allocators and every daemon's inventory agree);
    callable from sync and async tests alike."""
    async def run() -> dict:
        rpc = RpcClient(url)
        try:
            return await rpc.call("check")
        finally:
            await rpc.close()

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result()


@dataclass
class Pool:
    """A master and one daemon as separate processes."""

    tmp: Path
    master_env: dict[str, str]
    daemon_env: dict[str, str]
    master_url: str = ""
    daemon_url: str = ""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start_master(self) -> None:
        proc, info = spawn("kvpool", ["master", "--port", "0"], self.master_env,
                            self.tmp / "master.log")
        self.procs["master"], self.master_url = proc, info["master"]

    def start_daemon(self) -> None:
        proc, info = spawn("kvpool", ["daemon", "--master", self.master_url, "--node-id", "node0",
                            "--data-dir", str(self.tmp / "node0")], self.daemon_env,
                           self.tmp / "daemon.log")
        self.procs["daemon"], self.daemon_url = proc, info["daemon"]

    def kill_daemon(self, sig: int = signal.SIGKILL) -> None:
        stop(self.procs.pop("daemon"), sig)

    def client_config(self, **overrides: object) -> ClientConfig:
        return ClientConfig(master_url=self.master_url, **overrides)  # type: ignore[arg-type]

    def check(self) -> dict:
        """The master's invariants, its index against the daemon's inventory included."""
        return master_check(self.master_url)

    def stop(self) -> None:
        for name in ("daemon", "master"):
            if name in self.procs:
                stop(self.procs.pop(name))


MASTER_ENV = {"KVPOOL_MASTER_PUT_TIMEOUT_S": "2", "KVPOOL_MASTER_SWEEP_INTERVAL_S": "0.2",
              "KVPOOL_MASTER_READ_LEASE_S": "30"}
DAEMON_ENV = {"KVPOOL_DAEMON_HOST_BYTES": "256MiB", "KVPOOL_DAEMON_SSD_BYTES": "256MiB",
              "KVPOOL_DAEMON_OBJECT_BYTES": "1GiB", "KVPOOL_DAEMON_HEARTBEAT_S": "0.5",
              "KVPOOL_DAEMON_NODE_TTL_S": "3"}


def make_pool(tmp: Path, master_env: dict[str, str] | None = None,
              daemon_env: dict[str, str] | None = None) -> Pool:
    pool = Pool(tmp, {**MASTER_ENV, **(master_env or {})}, {**DAEMON_ENV, **(daemon_env or {})})
    pool.start_master()
    pool.start_daemon()
    return pool


@pytest.fixture(scope="module")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pool]:
    """One master and one daemon shared by a module's tests (they use distinct keys)."""
    p = make_pool(tmp_path_factory.mktemp("pool"))
    try:
        yield p
        p.check()  # after every test of the module: index, allocators and inventory agree
    finally:
        p.stop()


def admin(url: str, path: str, method: str = "GET", body: dict | None = None,
          token: str = "") -> tuple[int, dict]:
    """A JSON admin call; returns the status and the decoded body, errors included."""
    req = urllib.request.Request(url + path, method=method,
                                 data=json.dumps(body).encode() if body is not None else None)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def host_used(url: str) -> int:
    nodes = admin(url, "/v1/nodes")[1]["nodes"]
    return sum(t["used"] for n in nodes for t in n["tiers"] if t["kind"] == "host")


def wait_for(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)
