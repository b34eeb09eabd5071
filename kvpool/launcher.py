"""A whole cluster on one machine, as separate processes: an etcd server, masters and
daemons on free ports, each with its own data folder and log. Behind `kvpool cluster up`
and the cluster benchmark; every process is stopped by its own pid."""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from kvpool.auth import bearer, new_secret, secret
from kvpool.errors import ConfigError, Unavailable


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Proc:
    role: str  # etcd, master, daemon
    name: str
    url: str
    popen: subprocess.Popen
    log: Path

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, wait_s: float = 20.0) -> None:
        stop(self.popen, sig, wait_s)


START_S = 180.0  # a loaded 2-core machine has taken over 60 s to start a daemon


def spawn(module: str, args: list[str], env: dict[str, str], log: Path,
          start_s: float = START_S) -> tuple[subprocess.Popen, dict]:
    """Start ``python -m module args`` with its stderr in ``log``; wait (at most
    ``start_s``) for the one JSON line on stdout by which kvpool's and the engines' servers
    announce their endpoints."""
    popen = subprocess.Popen([sys.executable, "-u", "-m", module, *args],
                             env={**os.environ, **env}, stdout=subprocess.PIPE,
                             stderr=log.open("ab"))
    assert popen.stdout is not None
    deadline = time.monotonic() + start_s
    fd, pending = popen.stdout.fileno(), b""
    with selectors.DefaultSelector() as sel:  # a blocking readline would wait past the deadline
        sel.register(fd, selectors.EVENT_READ)
        while (left := deadline - time.monotonic()) > 0:
            if not sel.select(timeout=left):
                continue
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if line.startswith(b"{"):
                    return popen, json.loads(line)
    popen.kill()
    popen.wait()
    raise Unavailable(f"`python -m {module} {' '.join(args)}` did not start within "
                      f"{start_s:.0f} s; the end of {log}:\n"
                      f"{log.read_text(errors='replace')[-2000:]}")


def stop(popen: subprocess.Popen, sig: int = signal.SIGTERM, wait_s: float = 20.0) -> None:
    """Signal a process we started and reap it (killed if it lingers past ``wait_s``)."""
    if popen.poll() is None:
        popen.send_signal(sig)
        try:
            popen.wait(timeout=wait_s)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait()


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


@dataclass
class LocalCluster:
    """Start with ``start_etcd``, then masters and daemons; ``stop`` ends them all."""

    root: Path
    cluster: str = "default"
    ttl_s: float = 3.0
    master_env: dict[str, str] = field(default_factory=dict)  # for every master
    daemon_env: dict[str, str] = field(default_factory=dict)  # for every daemon
    procs: dict[str, Proc] = field(default_factory=dict)
    etcd_members: int = 1  # members of the etcd cluster; three survive the loss of one
    etcd_endpoint: str = ""  # every member's client address, comma-separated
    _etcd_ports: list[tuple[int, int]] = field(default_factory=list)  # (client, peer) each
    credentials: dict[str, str] = field(default_factory=dict)  # role -> "file:PATH"; empty: open

    def generate_credentials(self) -> dict[str, str]:
        """A fresh secret per role, each in a file of its own (mode 0600) under
        ``root/credentials``, handed to the masters and daemons this cluster starts as
        ``file:PATH`` (so no secret shows in a process listing or its environment)."""
        folder = self.root / "credentials"
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        for role in ("cluster", "client", "admin", "viewer"):
            path = folder / f"{role}.token"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(new_secret() + "\n")
            self.credentials[role] = f"file:{path}"
        c = self.credentials
        self.master_env = {**self.master_env, "KVPOOL_MASTER_CLUSTER_TOKEN": c["cluster"],
                           "KVPOOL_MASTER_CLIENT_TOKENS": c["client"],
                           "KVPOOL_MASTER_ADMIN_TOKEN": c["admin"],
                           "KVPOOL_MASTER_VIEWER_TOKEN": c["viewer"]}
        self.daemon_env = {**self.daemon_env, "KVPOOL_DAEMON_CLUSTER_TOKEN": c["cluster"]}
        return dict(c)

    def _headers(self) -> dict[str, str]:
        viewer = self.credentials.get("viewer")
        return bearer(secret(viewer, "viewer credential")) if viewer else {}

    def start_etcd(self) -> list[Proc]:
        """Start the etcd members; started again after ``stop_etcd``, they keep their data
        and ports."""
        binary = shutil.which("etcd")
        if binary is None:
            raise ConfigError("no etcd server binary on PATH: install one (apt-get install "
                              "etcd-server, or a release from github.com/etcd-io/etcd)")
        if not self._etcd_ports:
            self._etcd_ports = [(free_port(), free_port()) for _ in range(self.etcd_members)]
            self.etcd_endpoint = ",".join(f"127.0.0.1:{c}" for c, _ in self._etcd_ports)
        initial = ",".join(f"kvpool{i}=http://127.0.0.1:{peer}"
                           for i, (_, peer) in enumerate(self._etcd_ports))
        self.root.mkdir(parents=True, exist_ok=True)
        started = []
        for i, (client, peer) in enumerate(self._etcd_ports):
            name = "etcd" if len(self._etcd_ports) == 1 else f"etcd{i}"
            log = self.root / f"{name}.log"
            popen = subprocess.Popen([
                binary, "--name", f"kvpool{i}", "--data-dir", str(self.root / name),
                "--listen-client-urls", f"http://127.0.0.1:{client}",
                "--advertise-client-urls", f"http://127.0.0.1:{client}",
                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", initial, "--initial-cluster-token", f"kvpool-{self.cluster}"],
                stdout=log.open("ab"), stderr=subprocess.STDOUT)
            started.append(Proc("etcd", name, f"127.0.0.1:{client}", popen, log))
            self.procs[name] = started[-1]
        deadline = time.monotonic() + 30  # members answer healthy once they have a quorum
        for proc in started:
            while not _ready(f"http://{proc.url}/health"):
                if not proc.alive() or time.monotonic() > deadline:
                    raise Unavailable(f"etcd did not start; see {proc.log}")
                time.sleep(0.1)
        return started

    def stop_etcd(self, sig: int = signal.SIGTERM) -> None:
        for name in [n for n, p in self.procs.items() if p.role == "etcd"]:
            self.procs.pop(name).stop(sig)

    def _spawn(self, role: str, name: str, args: list[str], env: dict[str, str]) -> Proc:
        log = self.root / f"{name}.log"
        popen, info = spawn("kvpool", args, env, log)
        proc = self.procs[name] = Proc(role, name, info[role], popen, log)
        return proc

    def start_master(self, name: str, env: dict[str, str] | None = None) -> Proc:
        return self._spawn("master", name, [
            "master", "--port", "0", "--etcd", self.etcd_endpoint, "--cluster", self.cluster],
            {"KVPOOL_MASTER_LEADER_TTL_S": str(self.ttl_s), **self.master_env, **(env or {})})

    def start_daemon(self, node_id: str, env: dict[str, str] | None = None) -> Proc:
        return self._spawn("daemon", node_id, [
            "daemon", "--etcd", self.etcd_endpoint, "--cluster", self.cluster,
            "--node-id", node_id, "--data-dir", str(self.root / node_id)],
            {"KVPOOL_DAEMON_NODE_TTL_S": str(self.ttl_s), **self.daemon_env, **(env or {})})

    def masters(self) -> list[Proc]:
        return [p for p in self.procs.values() if p.role == "master"]

    def daemons(self) -> list[Proc]:
        return [p for p in self.procs.values() if p.role == "daemon"]

    def leader(self) -> Proc | None:
        """The master that is leader and ready, if one is."""
        for proc in self.masters():
            if proc.alive() and _ready(f"{proc.url}/readyz"):
                return proc
        return None

    def wait_leader(self, timeout_s: float = 30.0) -> Proc:
        deadline = time.monotonic() + timeout_s
        while (leader := self.leader()) is None:
            if time.monotonic() > deadline:
                raise Unavailable(f"no master became a ready leader within {timeout_s:.0f} s")
            time.sleep(0.05)
        return leader

    def nodes(self) -> set[str]:
        """The node ids the ready leader lists (none while there is no leader)."""
        leader = self.leader()
        if leader is None:
            return set()
        try:
            req = urllib.request.Request(f"{leader.url}/v1/nodes", headers=self._headers())
            with urllib.request.urlopen(req, timeout=2) as resp:
                return {n["node_id"] for n in json.load(resp)["nodes"]}
        except OSError:
            return set()

    def wait_nodes(self, expected: int | set[str], timeout_s: float = 30.0) -> None:
        """Until the leader lists ``expected`` nodes (a count, or exactly these ids)."""
        deadline = time.monotonic() + timeout_s
        while True:
            nodes = self.nodes()
            if (len(nodes) == expected) if isinstance(expected, int) else (nodes == expected):
                return
            if time.monotonic() > deadline:
                raise Unavailable(f"the leader did not list nodes {expected} within "
                                  f"{timeout_s:.0f} s (it lists {sorted(nodes)})")
            time.sleep(0.1)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.procs.pop(name).stop(sig)

    def stop(self) -> None:
        """Daemons first (they leave cleanly), then masters, then etcd."""
        for role in ("daemon", "master", "etcd"):
            for name in [n for n, p in self.procs.items() if p.role == role]:
                self.procs.pop(name).stop()
