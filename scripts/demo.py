"""`make demo`: a single-node pool, a prefill-like writer and a decode-like reader.

Starts `kvpool up` (no etcd), then replays requests from the Mooncake conversation trace
(or a generated multi-turn chat when the trace is absent). The writer process plays a
prefill engine: per request it asks the pool for the longest cached prefix and writes
only the missing blocks. The reader process plays a decode engine: it fetches every block
of each request straight into its own buffers and checks the bytes. Both are separate
processes that share nothing but the pool.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clients.client import AsyncPoolClient  # noqa: E402
from kvpool.keys import Namespace, block_keys  # noqa: E402

BLOCK_TOKENS = 512  # the trace's hash_ids each cover 512 tokens
LAYERS, KV_HEADS, HEAD_DIM = 2, 2, 64  # a small model: 512 KiB of float16 KV per block
NS = Namespace("demo-model", "float16", "LKHND", block_tokens=BLOCK_TOKENS, salt="demo")
TRACE = ROOT.parent / "shared" / "traces" / "conversation_trace.jsonl"


def workload(n: int) -> list[list[int]]:
    """Requests as lists of 512-token block ids that share prefixes."""
    if TRACE.exists():
        with TRACE.open() as f:
            return [json.loads(line)["hash_ids"] for _, line in zip(range(n), f)]
    rng = np.random.default_rng(0)
    system, out, next_id = [0, 1], [], 2
    for _ in range(n // 4):
        convo = list(system)
        for _turn in range(4):
            convo += list(range(next_id, next_id + int(rng.integers(1, 4))))
            next_id = convo[-1] + 1
            out.append(list(convo))
    return out


def tokens_of(hash_ids: list[int]) -> np.ndarray:
    """Deterministic tokens for each block id, so equal ids give equal prefixes."""
    return np.concatenate([np.random.default_rng(h).integers(0, 32000, BLOCK_TOKENS, dtype=np.int32)
                           for h in hash_ids])


def kv_block(key: bytes) -> np.ndarray:
    """Stand-in KV for a block: smooth float16 values derived from its key."""
    seed = int.from_bytes(key[:8], "little")
    base = np.random.default_rng(seed).standard_normal((2, LAYERS, KV_HEADS, 1, HEAD_DIM))
    ramp = np.linspace(0, 1, BLOCK_TOKENS).reshape(1, 1, 1, -1, 1)
    return np.ascontiguousarray((base * (1 + ramp)).astype(np.float16))


async def writer(master: str, n: int) -> dict:
    stats = {"requests": 0, "blocks": 0, "reused": 0, "written": 0, "put_s": 0.0}
    async with AsyncPoolClient(master_url=master) as pool:
        for hash_ids in workload(n):
            keys = block_keys(NS, tokens_of(hash_ids))
            hit = await pool.match_prefix(keys)
            if hit < len(keys):
                missing = keys[hit:]
                blocks = [kv_block(k) for k in missing]  # what prefill would have computed
                t = time.perf_counter()
                res = await pool.batch_put(missing, blocks, chained=True)
                stats["put_s"] += time.perf_counter() - t
                stats["written"] += sum(r.stored for r in res)
            stats["requests"] += 1
            stats["blocks"] += len(keys)
            stats["reused"] += hit
    return stats


async def reader(master: str, n: int) -> dict:
    stats = {"requests": 0, "blocks": 0, "fetched": 0, "bytes": 0, "wrong": 0, "get_s": 0.0}
    shape = kv_block(b"\0" * 16).shape
    async with AsyncPoolClient(master_url=master) as pool:
        bufs = [np.empty(shape, np.float16) for _ in range(64)]
        for buf in bufs:
            pool.register(buf)
        for hash_ids in workload(n):
            keys = block_keys(NS, tokens_of(hash_ids))[:64]
            t = time.perf_counter()
            results = await pool.batch_get(keys, bufs[:len(keys)])
            stats["get_s"] += time.perf_counter() - t
            for key, res, buf in zip(keys, results, bufs):
                if res.hit:
                    stats["fetched"] += 1
                    stats["bytes"] += buf.nbytes
                    stats["wrong"] += not np.array_equal(buf, kv_block(key))
            stats["requests"] += 1
            stats["blocks"] += len(keys)
    return stats


def role_main(role: str, master: str, n: int) -> None:
    stats = asyncio.run(writer(master, n) if role == "writer" else reader(master, n))
    print(json.dumps(stats), flush=True)


def run_role(role: str, master: str, n: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--role", role, "--master", master, "-n", str(n)],
                         check=True, capture_output=True, text=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--role", choices=["writer", "reader"])
    parser.add_argument("--master")
    parser.add_argument("-n", type=int, default=100, help="requests to replay")
    args = parser.parse_args()
    if args.role:
        return role_main(args.role, args.master, args.n)
    data = tempfile.mkdtemp(prefix="kvpool-demo-")
    env = dict(os.environ, KVPOOL_DAEMON_HOST_BYTES="2GiB", KVPOOL_DAEMON_SSD_BYTES="2GiB")
    print(f"starting `kvpool up` (single node, no etcd, data in {data}) ...", flush=True)
    up = subprocess.Popen([sys.executable, "-m", "clients.cli", "up", "--port", "0",
                           "--data-dir", data], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, text=True)
    try:
        master = ""
        for line in up.stdout:  # type: ignore[union-attr]
            if line.startswith("{"):
                master = json.loads(line)["master"]
                break
        if not master:
            sys.exit("kvpool up did not start; run `.venv/bin/kvpool up` to see why")
        print(f"pool ready: master {master}")
        source = "the Mooncake conversation trace" if TRACE.exists() else "a generated chat workload"
        print(f"prefill-like writer: replaying {args.n} requests from {source} ...", flush=True)
        w = run_role("writer", master, args.n)
        print(f"  {w['requests']} requests, {w['blocks']} blocks of {BLOCK_TOKENS} tokens: "
              f"{w['reused']} reused from the pool (prefix hits), {w['written']} written "
              f"in {w['put_s']:.2f} s")
        print("decode-like reader: fetching every block of every request ...", flush=True)
        r = run_role("reader", master, args.n)
        gbps = r["bytes"] / r["get_s"] / 1e9 if r["get_s"] else 0.0
        print(f"  {r['fetched']} of {r['blocks']} blocks fetched ({r['bytes'] / 2**20:.0f} MiB, "
              f"{gbps:.2f} GB/s through NIXL), {r['wrong']} with wrong bytes")
        subprocess.run([sys.executable, "-m", "clients.cli", "status", "--master", master], cwd=ROOT)
    finally:
        up.terminate()
        up.wait(timeout=30)


if __name__ == "__main__":
    main()
