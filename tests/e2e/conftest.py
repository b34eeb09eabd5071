"""Real processes for the engine tests: a pool (`kvpool up`, or master and daemon apart),
engines and a router from `python -m engine.serve`, on free ports, stopped by pid."""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from kvpool import launcher
from kvpool.launcher import stop
from tests.integration.conftest import master_check

ROOT = Path(__file__).resolve().parents[2]
POOL_ENV = {"KVPOOL_DAEMON_HOST_BYTES": "64MiB", "KVPOOL_DAEMON_SSD_BYTES": "64MiB",
            "KVPOOL_DAEMON_OBJECT_BYTES": "256MiB", "KVPOOL_DAEMON_HEARTBEAT_S": "0.5",
            "KVPOOL_DAEMON_NODE_TTL_S": "2", "KVPOOL_MASTER_SWEEP_INTERVAL_S": "0.2"}


def spawn(module: str, args: list[str], log: Path, env: dict[str, str] | None = None
          ) -> tuple[subprocess.Popen, dict[str, Any]]:
    return launcher.spawn(module, args, {**POOL_ENV, **(env or {})}, log)


@dataclass
class Stack:
    """A pool plus engines, each a process of its own."""

    tmp: Path
    master: str = ""
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)

    def pool_up(self) -> None:
        proc, info = spawn("kvpool", ["up", "--port", "0", "--data-dir", str(self.tmp / "pool")],
                           self.tmp / "pool.log")
        self.procs["pool"], self.master = proc, info["master"]

    def pool_apart(self) -> None:
        """Master and daemon as two processes, so the daemon can die alone."""
        proc, info = spawn("kvpool", ["master", "--port", "0"], self.tmp / "master.log")
        self.procs["master"], self.master = proc, info["master"]
        proc, _ = spawn("kvpool", ["daemon", "--master", self.master, "--node-id", "node0",
                                        "--data-dir", str(self.tmp / "node0")], self.tmp / "daemon.log")
        self.procs["daemon"] = proc

    def engine(self, name: str, role: str, *extra: str) -> str:
        args = [role, *extra] if role == "router" else [role, "--master", self.master, *extra]
        proc, info = spawn("engine.serve", args, self.tmp / f"{name}.log")
        self.procs[name], self.urls[name] = proc, info["url"]
        return info["url"]

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        stop(self.procs.pop(name), sig)

    def check_pool(self) -> dict[str, Any]:
        """The master's own invariants (index, allocators, daemon inventories)."""
        return master_check(self.master)

    def stop(self) -> None:
        for name in [n for n in self.procs if n not in ("pool", "master", "daemon")]:
            stop(self.procs.pop(name))
        for name in ("daemon", "master", "pool"):
            if name in self.procs:
                stop(self.procs.pop(name))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    s = Stack(tmp_path_factory.mktemp("stack"))
    try:
        yield s
    finally:
        s.stop()
