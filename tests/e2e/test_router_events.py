"""The router follows the engines' own KV events and the pool's: given a prompt that one
prefill engine holds in its own pages and the other could only load from the pool, it
picks the one that holds it, though it never sent that prompt anywhere (a guess from
what it sent would tie, and take the first engine)."""

from __future__ import annotations

import json
import random
import time
import urllib.request
from typing import Any

import pytest

from tests.e2e.conftest import Stack
from tests.e2e.test_disagg import post, stream

BT = 16


def engines(router: str) -> dict[str, Any]:
    with urllib.request.urlopen(router + "/v1/engines", timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture(scope="module")
def routed(stack: Stack) -> Stack:
    stack.pool_up()
    a, b = stack.engine("prefill_a", "prefill"), stack.engine("prefill_b", "prefill")
    d = stack.engine("decode", "decode")
    stack.engine("router", "router", "--prefill", a, "--prefill", b, "--decode", d,
                 "--pool", stack.master)
    return stack


def test_router_prefers_an_engine_own_pages_over_the_pool(routed: Stack) -> None:
    rng = random.Random(7)
    prompt = [rng.randrange(256) for _ in range(5 * BT + 3)]
    # Straight to the second prefill engine: its pages and the pool now hold 5 blocks.
    post(routed.urls["prefill_b"] + "/v1/prefill", {"token_ids": prompt, "max_tokens": 2})
    router = routed.urls["router"]
    deadline = time.monotonic() + 20
    while True:
        listed = engines(router)
        cached = {e["url"]: e["cached_blocks"] for e in listed["engines"]}
        if cached[routed.urls["prefill_b"]] >= 5 and listed["pool_blocks"] >= 5:
            break
        assert time.monotonic() < deadline, f"the router never heard of the blocks: {listed}"
        time.sleep(0.1)
    assert cached[routed.urls["prefill_a"]] == 0
    lines = stream(router + "/v1/generate", {"token_ids": prompt + [1, 2, 3], "max_tokens": 4})
    done = lines[-1]
    assert done.get("done"), lines
    assert done["prefill"] == routed.urls["prefill_b"], done
    assert done["reused_tokens"] == 5 * BT and done["pool_tokens"] == 0, done  # its own pages
    # A prompt neither engine holds but the pool does not either: the first (idle) engine.
    other = [rng.randrange(256) for _ in range(3 * BT)]
    done = stream(router + "/v1/generate", {"token_ids": other, "max_tokens": 2})[-1]
    assert done["prefill"] == routed.urls["prefill_a"], done
