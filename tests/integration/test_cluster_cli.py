"""`kvpool cluster up N`: a whole cluster on one machine from one command, usable by a
client through etcd alone, and gone (every process) after Ctrl-C."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from clients.client import AsyncPoolClient
from kvpool.config import ClientConfig
from kvpool.errors import Unauthorized
from tests.integration.conftest import ROOT


def test_cluster_up_starts_a_usable_cluster_and_stops_it_all(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-u", "-m", "kvpool", "cluster", "up", "2",
                             "--data-dir", str(tmp_path), "--ttl", "2", "--host-bytes", "64MiB",
                             "--ssd-bytes", "64MiB"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    pids: list[int] = []
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line.decode())
            if line.startswith(b"{"):
                break
        info = json.loads(lines[-1])
        text = "".join(lines)
        assert "(leader)" in text and "node1" in text and len(info["masters"]) == 2
        pids = [int(next(t for t in row.split()[2:] if t.isdigit())) for row in text.splitlines()
                if row.split()[:1] and row.split()[0] in ("etcd", "master", "daemon")]
        assert len(pids) == 5

        async def roundtrip(token: str) -> bool:
            cfg = ClientConfig(etcd=info["etcd"], cluster=info["cluster"], token=token)
            async with AsyncPoolClient(cfg) as client:
                key, value = os.urandom(16), np.frombuffer(os.urandom(1 << 16), np.uint8)
                await client.put(key, value)
                out = np.empty_like(value)
                return await client.get(key, out) is not None and np.array_equal(out, value)

        assert asyncio.run(roundtrip(info["credentials"]["client"]))  # generated, one per role
        with pytest.raises(Unauthorized):
            asyncio.run(roundtrip(""))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            rest = proc.communicate(timeout=60)[0].decode()
        except subprocess.TimeoutExpired:
            proc.kill()
            rest = (proc.communicate()[0] or b"").decode()
            tails = {log.name: log.read_text(errors="replace").splitlines()[-8:]
                     for log in sorted(tmp_path.glob("*.log"))}
            alive = [pid for pid in pids if Path(f"/proc/{pid}").exists()]
            pytest.fail(f"`kvpool cluster up` did not stop within 60 s of SIGINT; still running: "
                        f"{alive}; its output: {rest[-2000:]}; its processes' logs end: {tails}")
    assert proc.returncode == 0, rest
    for pid in pids:  # every process it started is gone
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
