"""kvpool with stock vLLM, end to end on a small random-weight model: a pool, a prefill
`vllm serve` (kv_producer), a decode `vllm serve` (kv_consumer) and kvpool's OpenAI router
in front; then a multi-turn chat (every turn resends the conversation) through the router.
Prints, per request, the prompt tokens, the prompt tokens the decode instance loaded from
the pool instead of computing, and the TTFT seen by the client.

    python scripts/demo_vllm.py [--conversations 3] [--turns 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kvpool.launcher import spawn, stop  # noqa: E402
from engine.vllm_kv import launch  # noqa: E402
from engine.vllm_kv.tiny_model import build  # noqa: E402

SYSTEM = ("You are the demo assistant of kvpool. The pool keeps blocks of keys and values so "
          "that a second engine can reuse the prefix of a prompt instead of computing it. ") * 6


def bar(done: float, total: float, label: str, width: int = 30) -> None:
    n = int(width * min(done / total, 1.0))
    sys.stderr.write(f"\r  [{'#' * n}{'.' * (width - n)}] {label}")
    sys.stderr.flush()


def wait_with_bar(servers: list[launch.VLLM], expect_s: float) -> None:
    err: list[BaseException] = []

    def wait() -> None:
        try:
            launch.wait_ready(servers)
        except BaseException as exc:  # reported below
            err.append(exc)

    t = threading.Thread(target=wait)
    t0 = time.monotonic()
    t.start()
    while t.is_alive():
        bar(time.monotonic() - t0, expect_s, f"starting vLLM ({time.monotonic() - t0:.0f} s)")
        t.join(2.0)
    sys.stderr.write("\n")
    if err:
        raise err[0]


def chat(router: str, messages: list[dict[str, str]]) -> tuple[str, float, int, int]:
    """One streamed chat turn: (reply, TTFT ms, prompt tokens, prompt tokens from the pool)."""
    body = {"model": "tiny", "messages": messages, "max_tokens": 24, "temperature": 0,
            "ignore_eos": True, "skip_special_tokens": False,  # a random model says </s> early
            "stream": True, "stream_options": {"include_usage": True}}
    req = urllib.request.Request(f"{router}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    ttft, text, usage = 0.0, [], {}
    with urllib.request.urlopen(req, timeout=300) as r:
        for raw in r:
            line = raw.decode().strip()
            if not line.startswith("data: {"):
                continue
            msg: dict[str, Any] = json.loads(line[6:])
            for c in msg.get("choices") or []:
                piece = (c.get("delta") or {}).get("content")
                if piece is not None:  # the first token, even one that prints as nothing
                    if not ttft:
                        ttft = (time.perf_counter() - t0) * 1e3
                    text.append(piece)
            usage = msg.get("usage") or usage
    details = usage.get("prompt_tokens_details") or {}
    return "".join(text), ttft, int(usage.get("prompt_tokens", 0)), int(details.get("cached_tokens") or 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=3)
    ap.add_argument("--turns", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kvpool-demo-vllm-"))
    print(f"model, logs and pool data in {tmp}")
    model = build(tmp / "model")
    pool, info = launch.start_pool(tmp, "1GiB")
    master = info["master"]
    print(f"pool up: master {master}")
    servers = [launch.start("prefill", model, tmp / "prefill.log", role="kv_producer", master=master),
               launch.start("decode", model, tmp / "decode.log", role="kv_consumer", master=master)]
    router_proc = None
    try:
        wait_with_bar(servers, 120.0)
        router_proc, rinfo = spawn("engine.vllm_kv.router", [
            "--prefill", servers[0].url, "--decode", servers[1].url, "--block-tokens", "32"],
            {}, tmp / "router.log")
        router = rinfo["url"]
        print(f"prefill {servers[0].url} (kv_producer), decode {servers[1].url} (kv_consumer), "
              f"router {router}\n")
        print(f"{'conv':>4} {'turn':>4} {'prompt':>7} {'from pool':>10} {'TTFT ms':>8}  reply")
        total = args.conversations * args.turns
        rows = []
        convs = [[{"role": "system", "content": SYSTEM}] for _ in range(args.conversations)]
        for turn in range(args.turns):
            for c, messages in enumerate(convs):
                messages.append({"role": "user", "content": f"question {turn} of conversation {c}: "
                                 "how do the blocks reach the decode engine?"})
                reply, ttft, n, pooled = chat(router, messages)
                messages.append({"role": "assistant", "content": reply})
                rows.append((n, pooled, ttft))
                sys.stderr.write("\r" + " " * 60 + "\r")
                print(f"{c:>4} {turn:>4} {n:>7} {pooled:>10} {ttft:>8.0f}  {reply[:40]!r}")
                bar(len(rows), total, f"{len(rows)}/{total} requests")
        sys.stderr.write("\n")
        prompt = sum(r[0] for r in rows)
        pooled = sum(r[1] for r in rows)
        print(f"\n{len(rows)} requests, {prompt} prompt tokens, {pooled} of them "
              f"({100 * pooled / max(prompt, 1):.0f}%) loaded by the decode instance from the pool")
    finally:
        if router_proc is not None:
            stop(router_proc)
        for s in servers:
            s.stop()
        stop(pool)


if __name__ == "__main__":
    main()
