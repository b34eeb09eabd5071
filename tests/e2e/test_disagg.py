"""Prefill → pool → decode as separate processes: the same tokens as monolithic
generation, prefix reuse across processes, recomputation of what the pool lost, model
isolation, and a decode engine killed mid-stream."""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.error
import urllib.request
from typing import Any

import aiohttp
import pytest
import torch

from clients.client import AsyncPoolClient
from engine.client import Generation, generate
from engine.config import ModelConfig
from engine.model import Transformer, generate as reference_generate
from engine.sampling import Sampling
from tests.e2e.conftest import Stack

BT = 16  # the engines' default block_tokens


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.set_num_threads(1)
    return Transformer.random(ModelConfig())


@pytest.fixture(scope="module")
def disagg(stack: Stack) -> Stack:
    stack.pool_up()
    prefill = stack.engine("prefill", "prefill")
    d1, d2 = stack.engine("decode1", "decode"), stack.engine("decode2", "decode")
    stack.engine("router", "router", "--prefill", prefill, "--decode", d1, "--decode", d2)
    return stack


def reference(model: Transformer, prompt: list[int], max_tokens: int,
              sampling: Sampling = Sampling()) -> list[int]:
    return reference_generate(model, prompt, max_tokens, BT, sampling)


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(256) for _ in range(n)]


def post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read())


def stream(url: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return [json.loads(raw) for raw in resp]


async def run_all(router: str, bodies: list[dict[str, Any]]) -> list[Generation]:
    async with aiohttp.ClientSession() as session:
        return await asyncio.gather(*(generate(session, router, b) for b in bodies))


def test_disaggregated_tokens_equal_monolithic(disagg: Stack, model: Transformer) -> None:
    rng = random.Random(1)
    system = tokens(rng, 40)  # a shared system prompt, not a multiple of BT
    # lengths on and off page boundaries: 40, 48, 64, 41, 47, 96, 80, 43
    prompts = [system + tokens(rng, n) for n in (0, 8, 24, 1, 7, 56, 40, 3)]
    bodies = [{"token_ids": p, "max_tokens": 12} for p in prompts]
    bodies[3].update(temperature=0.8, seed=11)
    first = asyncio.run(run_all(disagg.urls["router"], bodies))  # 8 requests in flight
    # second turn: each conversation grows, so it reuses the blocks of the first
    turns = [p + g.tokens + tokens(rng, 9) for p, g in zip(prompts, first)]
    second = asyncio.run(run_all(disagg.urls["router"], [{"token_ids": t, "max_tokens": 12} for t in turns]))
    shared = len(system) // BT  # blocks a decode engine may hold from an earlier request
    for body, g in zip(bodies, first):
        assert g.error is None, g.error
        assert g.done is not None
        full = len(body["token_ids"]) // BT
        # a decode engine never computed these prompts: every full block past the shared
        # system prompt comes from the pool, and so does the trailing partial block
        assert full - shared <= g.done["decode_fetched_blocks"] <= full
        assert g.done["decode_partial_fetched"] == bool(len(body["token_ids"]) % BT)
        sampling = Sampling(body.get("temperature", 0.0), body.get("seed", 0))
        assert g.tokens == reference(model, body["token_ids"], 12, sampling)
    # the system prompt's blocks reached a fresh decode engine through the pool at least once
    assert sum(g.done["decode_fetched_blocks"] for g in first) >= \
        sum(len(b["token_ids"]) // BT - shared for b in bodies) + shared  # type: ignore[index]
    for t, g in zip(turns, second):
        assert g.error is None, g.error
        assert g.tokens == reference(model, t, 12)
        assert g.done is not None and g.done["reused_tokens"] >= (len(t) - 12 - 9) // BT * BT - BT
        assert g.done["decode_fetched_blocks"] <= len(t) // BT
    assert sum(g.done["reused_tokens"] for g in second) > 0  # type: ignore[index]
    assert {g.done["decode"] for g in first + second} == {disagg.urls["decode1"], disagg.urls["decode2"]}  # type: ignore[index]


def test_a_later_prefill_process_reuses_the_blocks_of_another(disagg: Stack, model: Transformer) -> None:
    rng = random.Random(2)
    prompt = tokens(rng, 5 * BT + 3)
    handoff = post(disagg.urls["prefill"] + "/v1/prefill", {"token_ids": prompt, "max_tokens": 8})
    assert handoff["reused_tokens"] == 0
    later = disagg.engine("prefill-later", "prefill")  # started after the blocks were written
    try:
        turn = prompt + tokens(rng, 20)
        h2 = post(later + "/v1/prefill", {"token_ids": turn, "max_tokens": 8})
        assert h2["reused_tokens"] == 5 * BT  # every full block of the first prompt, from the pool
        lines = stream(disagg.urls["decode1"] + "/v1/decode", h2)
        got = [h2["first_token"]] + [m["token"] for m in lines if "token" in m]
        assert got == reference(model, turn, 8)
    finally:
        disagg.kill("prefill-later")


def test_a_block_lost_before_the_fetch_is_recomputed(disagg: Stack, model: Transformer) -> None:
    prompt = tokens(random.Random(3), 5 * BT + 7)
    handoff = post(disagg.urls["prefill"] + "/v1/prefill", {"token_ids": prompt, "max_tokens": 10})

    async def remove_third_block() -> None:
        async with AsyncPoolClient(master_url=disagg.master) as pool:
            await pool.remove(handoff["keys"][2], force=True)
            assert await pool.match_prefix(handoff["keys"]) == 2

    asyncio.run(remove_third_block())
    lines = stream(disagg.urls["decode2"] + "/v1/decode", handoff)
    assert lines[-1]["done"] and lines[-1]["fetched_blocks"] == 2  # blocks 2.. were recomputed
    got = [handoff["first_token"]] + [m["token"] for m in lines if "token" in m]
    assert got == reference(model, prompt, 10)


def test_other_models_never_share_blocks(disagg: Stack, model: Transformer) -> None:
    prompt = tokens(random.Random(4), 4 * BT)
    post(disagg.urls["prefill"] + "/v1/prefill", {"token_ids": prompt, "max_tokens": 4})
    other_seed = disagg.engine("prefill-seed7", "prefill", "--seed", "7")
    other_dtype = disagg.engine("prefill-bf16", "prefill", "--dtype", "bfloat16")
    try:
        for url in (other_seed, other_dtype):
            h = post(url + "/v1/prefill", {"token_ids": prompt, "max_tokens": 4})
            assert h["reused_tokens"] == 0
            # a decode engine of the first model refuses the handoff instead of mixing KV
            lines = stream(disagg.urls["decode1"] + "/v1/decode", h)
            assert lines[-1]["error"] == "bad_request" and "another model" in lines[-1]["message"]
        again = post(other_seed + "/v1/prefill", {"token_ids": prompt + [1], "max_tokens": 4})
        assert again["reused_tokens"] == 4 * BT  # its own blocks, though
    finally:
        disagg.kill("prefill-seed7")
        disagg.kill("prefill-bf16")


@pytest.mark.parametrize("body, status, words", [
    ({"max_tokens": 4}, 400, "prompt"),
    ({"token_ids": [1, 2, 999], "max_tokens": 4}, 400, "token ids must lie in [0, 256)"),
    ({"token_ids": [1, 2], "max_tokens": 0}, 400, "max_tokens must be at least 1"),
    ({"token_ids": [1] * 8000, "max_tokens": 500}, 400, "exceed the model's 8192 positions"),
])
def test_bad_requests_get_a_clear_error(disagg: Stack, body: dict[str, Any], status: int,
                                        words: str) -> None:
    req = urllib.request.Request(disagg.urls["router"] + "/v1/generate", method="POST",
                                 data=json.dumps(body).encode())
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            code, lines = resp.status, [json.loads(raw) for raw in resp]
            message = lines[-1].get("message", "")
    except urllib.error.HTTPError as err:
        code, message = err.code, json.loads(err.read())["message"]
    if code == 200:  # the router accepted the body; the engine refused it in the stream
        assert lines[-1]["error"] == "bad_request"
    else:
        assert code == status
    assert words in message


def test_killing_a_decode_engine_fails_its_requests_only(disagg: Stack, model: Transformer) -> None:
    rng = random.Random(5)
    prompts = [tokens(rng, 30 + 7 * i) for i in range(6)]
    router = disagg.urls["router"]

    async def scenario() -> list[Generation]:
        async with aiohttp.ClientSession() as session:
            tasks = [asyncio.create_task(generate(session, router, {"token_ids": p, "max_tokens": 400}))
                     for p in prompts]
            deadline = time.monotonic() + 30
            while True:  # wait until both decode engines stream
                async with session.get(router + "/v1/engines") as resp:
                    running = {e["url"]: e["running"] for e in (await resp.json())["engines"]
                               if e["role"] == "decode"}
                if all(running.values()) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
            disagg.kill("decode2")
            return await asyncio.gather(*tasks)

    results = asyncio.run(scenario())
    lost = [g for g in results if g.error is not None]
    kept = [(p, g) for p, g in zip(prompts, results) if g.error is None]
    assert lost and kept
    for g in lost:
        assert disagg.urls["decode2"] in g.error and "retry" in g.error  # type: ignore[operator]
        assert 0 < len(g.tokens) < 400
    for p, g in kept:
        assert g.done["decode"] == disagg.urls["decode1"]  # type: ignore[index]
        assert g.tokens == reference(model, p, 400)
    after = asyncio.run(run_all(router, [{"token_ids": prompts[0], "max_tokens": 6}]))[0]
    assert after.error is None and after.tokens == reference(model, prompts[0], 6)
    disagg.check_pool()
