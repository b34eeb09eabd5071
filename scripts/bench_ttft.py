"""TTFT with prefix reuse, and decode TPOT under a stream of long prefills: disaggregated
(prefill engine → pool → decode engine) against monolithic (one process does both).

Processes: `kvpool up`; a "warm" prefill engine that writes prefixes into the pool; the
measured prefill engine (which never saw them, so its reuse comes from the pool); a
decode engine; a mono engine without a pool; a router in front of each mode. Every
engine runs one torch thread.

- TTFT: a 4096-token prompt whose first 0%, 50% or 90% was prefilled before by the warm
  engine; time from the request to the first token at the measured prefill engine (it
  streams the token, then the handoff once its new blocks are committed). Median of
  --reps fresh prompts per level.
- TPOT: inter-token gaps of a few concurrent decode streams, idle, then while long
  prompts (max_tokens 1) arrive every 1.2 prefill times (the same schedule in both
  modes); p50 and p99 over every gap after each stream's second token.
- bit_exact: the decode streams' tokens are equal in both modes.
- partial block: what the decode engine's choice costs; recomputing the trailing
  partial block from its tokens against fetching one block from the pool.

Prints a table; --json PATH writes the numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchlib import machine  # noqa: E402
from kvpool import launcher  # noqa: E402
from kvpool.tasks import run as run_loop  # noqa: E402
from engine.client import Generation, first_token, generate  # noqa: E402


def start(args: list[str], log: Path) -> tuple[subprocess.Popen, str]:
    env = {"KVPOOL_DAEMON_HOST_BYTES": "2GiB", "KVPOOL_DAEMON_SSD_BYTES": "1GiB"}
    proc, info = launcher.spawn(args[0], args[1:], env, log)
    return proc, info.get("url") or info["master"]


def pct(values: list[float], q: float) -> float:
    v = sorted(values)
    return v[min(len(v) - 1, int(round(q * (len(v) - 1))))]


def progress(msg: str) -> None:
    print(f"\r  {msg:<70}", end="", file=sys.stderr, flush=True)


async def post(session: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> dict[str, Any]:
    async with session.post(url, json=body) as resp:
        out = await resp.json()
        if resp.status != 200:
            raise SystemExit(f"{url}: {out}")
        return out


async def measure_ttft(warm: str, measured: str, length: int, reps: int, seed: int
                       ) -> dict[str, Any]:
    rng = random.Random(seed)
    out: dict[str, Any] = {}
    async with aiohttp.ClientSession() as session:
        # one untimed request first: the measured engine connects to the pool's daemon
        await post(session, f"{measured}/v1/prefill",
                   {"token_ids": [rng.randrange(256) for _ in range(length)], "max_tokens": 1})
        for level in (0, 50, 90):
            times, reused = [], []
            for r in range(reps):
                progress(f"TTFT: {level}% of the prefix in the pool, prompt {r + 1}/{reps}")
                prompt = [rng.randrange(256) for _ in range(length)]
                prefix = prompt[:length * level // 100]
                if prefix:  # another engine computed this prefix earlier
                    await post(session, f"{warm}/v1/prefill", {"token_ids": prefix, "max_tokens": 1})
                ttft, h = await first_token(session, measured, prompt)
                times.append(ttft)
                reused.append(h["pool_tokens"])
            out[str(level)] = {"ttft_ms": statistics.median(times), "pool_tokens": min(reused)}
    return out


async def measure_tpot(router: str, streams: int, out_tokens: int, long_prompt: int,
                       every_s: float | None, seed: int, label: str
                       ) -> tuple[list[float], list[list[int]], int]:
    """Decode streams' inter-token gaps; with ``every_s``, a long prompt arrives at that
    interval while they run (the same schedule for both modes)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(256) for _ in range(200 + 37 * i)] for i in range(streams)]
    done = asyncio.Event()
    pending: list[asyncio.Task[Generation]] = []

    async def arrivals(session: aiohttp.ClientSession, group: asyncio.TaskGroup) -> int:
        load_rng, sent = random.Random(seed + 1), 0
        while not done.is_set():
            body = {"token_ids": [load_rng.randrange(256) for _ in range(long_prompt)], "max_tokens": 1}
            pending.append(group.create_task(generate(session, router, body)))
            sent += 1
            try:
                await asyncio.wait_for(done.wait(), every_s)
            except asyncio.TimeoutError:
                pass
        return sent

    async def stream(session: aiohttp.ClientSession, p: list[int]) -> Generation:
        g = await generate(session, router, {"token_ids": p, "max_tokens": out_tokens})
        if g.error:
            raise SystemExit(f"decode stream failed: {g.error}")
        progress(f"TPOT {label}: {len(g.tokens)} tokens streamed")
        return g

    # the group ends once the arrivals stop and every long prompt they sent has finished
    async with aiohttp.ClientSession() as session, asyncio.TaskGroup() as group:
        loader = group.create_task(arrivals(session, group)) if every_s else None
        if loader is not None:
            await asyncio.sleep(0.2)  # the first long prompt is already computing
        gens = await asyncio.gather(*(stream(session, p) for p in prompts))
        done.set()
    sent = loader.result() if loader is not None else 0
    for task in pending:
        if task.result().error:
            raise SystemExit(f"long prefill failed: {task.result().error}")
    gaps = [x for g in gens for x in g.tpot_ms[1:]]
    return gaps, [g.tokens for g in gens], sent


async def partial_block_cost(master: str, preset: str, bt: int, length: int) -> dict[str, float]:
    """Recompute the trailing partial block (bt - 1 tokens after length - bt + 1 cached ones)
    against a batch_get of one block, in this process, one torch thread."""
    import torch

    from clients.client import AsyncPoolClient
    from engine.cache import PagedKVCache
    from engine.config import PRESETS
    from engine.model import Transformer
    from kvpool.keys import Namespace, block_keys

    torch.set_num_threads(1)
    model = Transformer.random(PRESETS[preset])
    cache = PagedKVCache(model.cfg, length // bt + 2, bt)
    pages = cache.allocate(cache.num_pages)
    tokens = [random.Random(3).randrange(256) for _ in range(length + bt - 1)]
    model.prefill(cache, pages, tokens[:length], 0)
    recompute = []
    for _ in range(5):
        t = time.perf_counter()
        model.prefill(cache, pages, tokens, length)
        recompute.append((time.perf_counter() - t) * 1e3)
    ns = Namespace("bench-partial", model.cfg.dtype, cache.layout_tag(), block_tokens=bt)
    keys = block_keys(ns, tokens[:length])
    fetch = []
    async with AsyncPoolClient(master_url=master) as pool:
        pool.register(cache.kv)
        await pool.batch_put(keys[-8:], [cache.page(p) for p in pages[length // bt - 8:length // bt]])
        for i in range(8):
            t = time.perf_counter()
            await pool.batch_get([keys[-8 + i]], [cache.page(pages[-1])])
            fetch.append((time.perf_counter() - t) * 1e3)
    return {"recompute_ms": statistics.median(recompute), "fetch_ms": statistics.median(fetch),
            "block_kib": cache.page_bytes / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smaller model and prompt")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    preset, length, bt, streams, out_tokens = ("bench", 4096, 32, 4, 300)
    if args.quick:
        preset, length, bt, streams, out_tokens = ("small", 1024, 32, 4, 100)
    data = Path(tempfile.mkdtemp(prefix="kvpool-bench-ttft-"))
    procs: list[subprocess.Popen] = []
    t0 = time.perf_counter()
    host = machine("every process on this one machine; NIXL UCX over loopback (CPU DRAM)")
    try:
        print(f"bench_ttft: model '{preset}', {length}-token prompts, {bt}-token blocks, one torch "
              f"thread per engine; {host['cpu']}, {host['cores']} cores", flush=True)
        up, master = start(["kvpool", "up", "--port", "0", "--data-dir", str(data / "pool")],
                           data / "pool.log")
        procs.append(up)
        eng = ["--model", preset, "--block-tokens", str(bt), "--num-pages", str(4 * length // bt + 64)]
        names = ("warm", "prefill", "decode", "mono")
        urls: dict[str, str] = {}
        for name in names:
            role = "prefill" if name == "warm" else name
            pool = [] if name == "mono" else ["--master", master]
            proc, urls[name] = start(["engine.serve", role, *pool, *eng], data / f"{name}.log")
            procs.append(proc)
        proc, disagg = start(["engine.serve", "router", "--prefill", urls["prefill"], "--decode",
                              urls["decode"]], data / "router.log")
        procs.append(proc)
        proc, mono = start(["engine.serve", "router", "--mono", urls["mono"]], data / "router-mono.log")
        procs.append(proc)

        ttft = run_loop(measure_ttft(urls["warm"], urls["prefill"], length, args.reps, 1))
        tpot: dict[str, dict[str, float]] = {}
        outputs: dict[str, list[list[int]]] = {}
        arrivals: dict[str, int] = {}
        # a long prompt every 1.2 prefill times: the prefill engine is busy most of the time,
        # and in mono each one stalls a decode step of every stream, well over 1% of them
        every = 1.2 * ttft["0"]["ttft_ms"] / 1e3
        for mode, router in (("disagg", disagg), ("mono", mono)):
            idle, outputs[mode], _ = run_loop(measure_tpot(router, streams, out_tokens, length,
                                                              None, 7, f"{mode} idle"))
            loaded, again, arrivals[mode] = run_loop(measure_tpot(router, streams, out_tokens,
                                                                     length, every, 7, f"{mode} loaded"))
            assert again == outputs[mode], f"{mode}: the same prompts gave other tokens under load"
            tpot[mode] = {"idle_p50": pct(idle, 0.5), "idle_p99": pct(idle, 0.99),
                          "loaded_p50": pct(loaded, 0.5), "loaded_p99": pct(loaded, 0.99)}
        progress("partial block: recompute against fetch")
        partial = run_loop(partial_block_cost(master, preset, bt, length))
        print(file=sys.stderr)
    finally:
        for p in reversed(procs):
            launcher.stop(p)
        shutil.rmtree(data, ignore_errors=True)

    ratio = ttft["90"]["ttft_ms"] / ttft["0"]["ttft_ms"]
    result = {
        "ttft_ms": {k: round(v["ttft_ms"], 2) for k, v in ttft.items()},
        "ttft_ratio_90": round(ratio, 4),
        "tpot_ms": {m: {k: round(v, 3) for k, v in t.items()} for m, t in tpot.items()},
        "bit_exact": outputs["disagg"] == outputs["mono"],
        "pool_tokens": {k: v["pool_tokens"] for k, v in ttft.items()},
        "long_prompts_during_load": arrivals,
        "long_prompt_every_s": round(every, 3),
        "partial_block": {k: round(v, 3) for k, v in partial.items()},
        "config": {"model": preset, "prompt_tokens": length, "block_tokens": bt,
                   "decode_streams": streams, "output_tokens": out_tokens, "reps": args.reps,
                   "torch_threads": 1},
        "machine": host,
    }
    print(f"\n{'prefix in pool':<16} {'pool tokens':>11} {'TTFT ms':>9} {'vs 0%':>6}")
    for level, v in ttft.items():
        print(f"{level + '%':<16} {v['pool_tokens']:>11} {v['ttft_ms']:>9.1f} "
              f"{v['ttft_ms'] / ttft['0']['ttft_ms']:>6.3f}")
    print(f"\n{'decode TPOT ms':<16} {'idle p50':>9} {'idle p99':>9} {'loaded p50':>11} "
          f"{'loaded p99':>11} {'loaded/idle p99':>16}")
    for mode, t in tpot.items():
        print(f"{mode:<16} {t['idle_p50']:>9.2f} {t['idle_p99']:>9.2f} {t['loaded_p50']:>11.2f} "
              f"{t['loaded_p99']:>11.2f} {t['loaded_p99'] / t['idle_p99']:>16.2f}")
    print(f"\nlong prompts that arrived during the loaded runs (one every {every:.2f} s): {arrivals}")
    print(f"decode tokens identical in both modes: {result['bit_exact']}")
    print(f"trailing partial block ({bt - 1} tokens at position {length}): recompute "
          f"{partial['recompute_ms']:.2f} ms, fetch of one {partial['block_kib']:.0f} KiB block "
          f"{partial['fetch_ms']:.2f} ms")
    print(f"targets: ttft_ratio_90 {ratio:.3f} (<= 0.15); disaggregated loaded/idle p99 "
          f"{tpot['disagg']['loaded_p99'] / tpot['disagg']['idle_p99']:.2f} (<= 1.5); "
          f"ran {time.perf_counter() - t0:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
