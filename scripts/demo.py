"""`make demo`: prefill → pool → decode on one machine, with prefix reuse.

Starts `kvpool up` (no etcd), a prefill engine, a decode engine and the router, each a
process of its own, then replays a generated multi-turn chat: every conversation starts
with the same system prompt, and every turn resends the whole conversation so far, so
prompts share growing prefixes. Prints, per request, the prompt tokens, the tokens
reused from the pool, time to first token and time per output token; then totals and the
pool's tiers; then TTFT of the longest prompts with and without reuse (two new prefill
engines, one whose namespace has nothing in the pool, one that can reuse only the pool);
and checks the tokens against a monolithic engine (one process, no pool).
"""

from __future__ import annotations

import argparse
import asyncio
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

from engine import tokenizer  # noqa: E402
from kvpool import launcher  # noqa: E402
from kvpool.tasks import run as run_loop  # noqa: E402
from engine.client import Generation, first_token, generate  # noqa: E402

SYSTEM = ("You are kvpool's demo assistant. You answer questions about serving large language "
          "models: prefill and decode, paged KV caches, prefix reuse, tiered storage of KV "
          "blocks in GPU memory, host memory, SSD and object stores, and the routing of "
          "requests to the engines that already hold their prefix. Answer briefly. ")
QUESTIONS = ["What is a KV cache?", "Why split prefill from decode?", "How big is one block?",
             "What happens when a daemon dies?", "Which block is evicted first?",
             "How does the router pick an engine?", "Is the output the same as monolithic?",
             "What does TTFT measure?", "And TPOT?", "Where do cold blocks go?"]


def start(args: list[str], log: Path, env: dict[str, str] | None = None
          ) -> tuple[subprocess.Popen, dict[str, Any]]:
    return launcher.spawn(args[0], args[1:], env or {}, log)


class Progress:
    def __init__(self, total: int, label: str) -> None:
        self.total, self.done, self.label, self.t0 = total, 0, label, time.perf_counter()

    def step(self) -> None:
        self.done += 1
        width = 30
        filled = width * self.done // self.total
        print(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
              f"{time.perf_counter() - self.t0:5.1f}s", end="", file=sys.stderr, flush=True)
        if self.done == self.total:
            print(file=sys.stderr)


async def chat(router: str, conversations: int, turns: int, max_tokens: int,
               progress: Progress) -> list[tuple[int, int, list[int], Generation]]:
    """Run the conversations concurrently; the turns of one conversation in order."""
    out: list[tuple[int, int, list[int], Generation]] = []

    async def one(session: aiohttp.ClientSession, c: int) -> None:
        rng = random.Random(c)
        history = tokenizer.encode(SYSTEM)
        for t in range(turns):
            history += tokenizer.encode(f"\nUser {c}: {rng.choice(QUESTIONS)}\nAssistant:")
            prompt = list(history)
            g = await generate(session, router, {"token_ids": prompt, "max_tokens": max_tokens})
            if g.error:
                raise SystemExit(f"request failed: {g.error}")
            out.append((c, t, prompt, g))
            history += g.tokens
            progress.step()

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(one(session, c) for c in range(conversations)))
    return out


async def with_and_without_reuse(cold: str, fresh: str, prompts: list[list[int]]
                                 ) -> list[tuple[float, float, int]]:
    """Per prompt: TTFT at an engine that can reuse nothing, TTFT at one that can reuse only
    what is in the pool, and how many prompt tokens the latter fetched from the pool."""
    out = []
    async with aiohttp.ClientSession() as session:
        for prompt in prompts:
            cold_ms, _ = await first_token(session, cold, prompt)
            pool_ms, handoff = await first_token(session, fresh, prompt)
            out.append((cold_ms, pool_ms, int(handoff["pool_tokens"])))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--model", default="small", help="engine model preset (tiny, small, bench)")
    parser.add_argument("--block-tokens", type=int, default=32)
    parser.add_argument("--prefill-pages", type=int, default=96,
                        help="KV pages of the prefill engine: small, as accelerator memory is, so "
                             "older prefixes live only in the pool")
    parser.add_argument("--no-compare", action="store_true", help="skip the monolithic check")
    args = parser.parse_args()
    t0 = time.perf_counter()
    data = Path(tempfile.mkdtemp(prefix="kvpool-demo-"))
    env = {"KVPOOL_DAEMON_HOST_BYTES": "1GiB", "KVPOOL_DAEMON_SSD_BYTES": "1GiB"}
    engine_args = ["--model", args.model, "--block-tokens", str(args.block_tokens)]
    procs: list[subprocess.Popen] = []
    try:
        print(f"starting `kvpool up` (single node, no etcd, data in {data}) ...", flush=True)
        up, info = start(["kvpool", "up", "--port", "0", "--data-dir", str(data / "pool")],
                         data / "pool.log", env)
        procs.append(up)
        master = info["master"]
        print(f"starting a prefill engine ({args.prefill_pages} KV pages), a decode engine and the "
              f"router (model '{args.model}', {args.block_tokens}-token blocks, one torch thread "
              "each) ...", flush=True)
        p, pi = start(["engine.serve", "prefill", "--master", master, *engine_args,
                       "--num-pages", str(args.prefill_pages)], data / "prefill.log")
        d, di = start(["engine.serve", "decode", "--master", master, *engine_args], data / "decode.log")
        procs += [p, d]
        r, ri = start(["engine.serve", "router", "--prefill", pi["url"], "--decode", di["url"]],
                      data / "router.log")
        procs.append(r)
        n = args.conversations * args.turns
        print(f"replaying {args.conversations} conversations x {args.turns} turns "
              f"(shared system prompt of {len(tokenizer.encode(SYSTEM))} tokens) ...", flush=True)
        results = run_loop(chat(ri["url"], args.conversations, args.turns, args.max_tokens,
                                   Progress(n, "disaggregated")))
        results.sort(key=lambda x: (x[0], x[1]))
        print("\nreused: prompt tokens not computed (from the prefill engine's pages or the "
              "pool); pool: fetched from the pool")
        print(f"{'conv':>4} {'turn':>4} {'prompt':>7} {'reused':>7} {'pool':>6} {'TTFT ms':>8} {'TPOT ms':>8}")
        for c, t, prompt, g in results:
            assert g.done is not None
            print(f"{c:>4} {t:>4} {len(prompt):>7} {g.done['reused_tokens']:>7} "
                  f"{g.done['pool_tokens']:>6} {g.ttft_ms:>8.1f} {statistics.mean(g.tpot_ms):>8.2f}")
        prompt_tokens = sum(len(x[2]) for x in results)
        reused = sum(x[3].done["reused_tokens"] for x in results)  # type: ignore[index]
        ttfts = sorted(x[3].ttft_ms for x in results)
        tpots = sorted(v for x in results for v in x[3].tpot_ms)
        print(f"\ntotals: {n} requests, {prompt_tokens} prompt tokens, {reused} reused "
              f"({100 * reused / prompt_tokens:.0f}%), "
              f"{sum(len(x[3].tokens) for x in results)} generated")
        print(f"        TTFT p50 {ttfts[len(ttfts) // 2]:.1f} ms, p99 {ttfts[int(0.99 * (len(ttfts) - 1))]:.1f} ms; "
              f"TPOT p50 {tpots[len(tpots) // 2]:.2f} ms, p99 {tpots[int(0.99 * (len(tpots) - 1))]:.2f} ms")
        subprocess.run([sys.executable, "-m", "kvpool", "status", "--master", master], cwd=ROOT)
        last = [x[2] for x in results if x[1] == args.turns - 1]
        print("\nTTFT with and without reuse: the last turn of each conversation again, at two new\n"
              "prefill engines. 'cold' has another namespace (a salt), so nothing in the pool is\n"
              "its; 'pool' shares the namespace with empty pages, so all it reuses comes from the\n"
              "pool ...", flush=True)
        cold, ci = start(["engine.serve", "prefill", "--master", master, *engine_args,
                          "--salt", "cold"], data / "prefill-cold.log")
        fresh, fi = start(["engine.serve", "prefill", "--master", master, *engine_args],
                          data / "prefill-fresh.log")
        procs += [cold, fresh]
        reuse = run_loop(with_and_without_reuse(ci["url"], fi["url"], last))
        print(f"{'conv':>4} {'prompt':>7} {'from pool':>10} {'cold TTFT ms':>13} {'pool TTFT ms':>13} {'ratio':>6}")
        for c, (prompt, (cold_ms, pool_ms, pooled)) in enumerate(zip(last, reuse)):
            print(f"{c:>4} {len(prompt):>7} {pooled:>10} {cold_ms:>13.1f} {pool_ms:>13.1f} "
                  f"{pool_ms / cold_ms:>6.2f}")
        cold_p50 = statistics.median(r[0] for r in reuse)
        pool_p50 = statistics.median(r[1] for r in reuse)
        print(f"  TTFT p50 without reuse {cold_p50:.1f} ms, with the prefix from the pool "
              f"{pool_p50:.1f} ms ({cold_p50 / pool_p50:.1f}x faster)")
        if not args.no_compare:
            print("\nmonolithic check: the same conversations on one process that prefills and "
                  "decodes (its own pages only, no pool) ...", flush=True)
            m, mi = start(["engine.serve", "mono", *engine_args], data / "mono.log")
            procs.append(m)
            mr, mri = start(["engine.serve", "router", "--mono", mi["url"]], data / "router-mono.log")
            procs.append(mr)
            mono = run_loop(chat(mri["url"], args.conversations, args.turns, args.max_tokens,
                                    Progress(n, "monolithic   ")))
            mono.sort(key=lambda x: (x[0], x[1]))
            same = sum(a[3].tokens == b[3].tokens for a, b in zip(mono, results))
            mono_ttft = sorted(x[3].ttft_ms for x in mono)
            mono_tpot = sorted(v for x in mono for v in x[3].tpot_ms)
            print(f"  {same} of {n} requests generated identical tokens")
            print(f"  monolithic TTFT p50 {mono_ttft[len(mono_ttft) // 2]:.1f} ms, TPOT p50 "
                  f"{mono_tpot[len(mono_tpot) // 2]:.2f} ms, p99 "
                  f"{mono_tpot[int(0.99 * (len(mono_tpot) - 1))]:.2f} ms")
            if same != n:
                sys.exit("the disaggregated tokens differ from monolithic generation: a bug")
        print(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
    finally:
        for proc in reversed(procs):
            launcher.stop(proc)
        shutil.rmtree(data, ignore_errors=True)


if __name__ == "__main__":
    main()
