"""Engines keep their promise when the pool cannot: a daemon that dies between the prefix
match and the fetch means recomputation, never wrong tokens; and a mono engine behind the
router (the colocated baseline) generates the same tokens."""

from __future__ import annotations

import asyncio
import json
import random
import urllib.error

import aiohttp
import pytest
import torch

from engine.client import Generation, generate
from engine.config import ModelConfig
from engine.model import Transformer, generate as reference_generate
from tests.e2e.conftest import Stack
from tests.e2e.test_disagg import BT, post, stream, tokens


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.set_num_threads(1)
    return Transformer.random(ModelConfig())


def test_mono_engine_behind_the_router(stack: Stack, model: Transformer) -> None:
    stack.pool_apart()
    mono = stack.engine("mono", "mono")
    router = stack.engine("router-mono", "router", "--mono", mono)
    rng = random.Random(6)
    first = tokens(rng, 3 * BT + 5)
    second = first + tokens(rng, 11)

    async def run(prompt: list[int]):  # type: ignore[no-untyped-def]
        async with aiohttp.ClientSession() as session:
            return await generate(session, router, {"token_ids": prompt, "max_tokens": 9})

    a, b = asyncio.run(run(first)), asyncio.run(run(second))
    assert a.tokens == reference_generate(model, first, 9, BT)
    assert b.tokens == reference_generate(model, second, 9, BT)
    assert a.done["reused_tokens"] == 0 and b.done["reused_tokens"] == 3 * BT  # type: ignore[index]


def test_decode_can_recompute_the_partial_block_instead(stack: Stack, model: Transformer) -> None:
    prefill = stack.engine("prefill", "prefill")
    decode = stack.engine("decode-recompute", "decode", "--partial-block", "recompute")
    prompt = tokens(random.Random(9), 3 * BT + 5)
    handoff = post(prefill + "/v1/prefill", {"token_ids": prompt, "max_tokens": 6})
    lines = stream(decode + "/v1/decode", handoff)
    assert lines[-1]["fetched_blocks"] == 3 and not lines[-1]["partial_fetched"]
    assert [handoff["first_token"]] + [m["token"] for m in lines if "token" in m] == \
        reference_generate(model, prompt, 6, BT)


def test_a_dead_daemon_means_recomputation(stack: Stack, model: Transformer) -> None:
    prefill, decode = stack.urls["prefill"], stack.engine("decode", "decode")
    prompt = tokens(random.Random(7), 4 * BT + 2)
    handoff = post(prefill + "/v1/prefill", {"token_ids": prompt, "max_tokens": 8})
    stack.kill("daemon")  # the blocks are listed, then gone: the fetch must fail
    lines = stream(decode + "/v1/decode", handoff)
    assert lines[-1]["done"] and lines[-1]["fetched_blocks"] == 0 and not lines[-1]["partial_fetched"]
    assert [handoff["first_token"]] + [m["token"] for m in lines if "token" in m] == \
        reference_generate(model, prompt, 8, BT)
    # with no daemon at all, engines still serve: nothing is cached, nothing is wrong
    fresh = tokens(random.Random(8), 2 * BT + 9)
    h = post(prefill + "/v1/prefill", {"token_ids": fresh, "max_tokens": 5})
    lines = stream(decode + "/v1/decode", h)
    assert [h["first_token"]] + [m["token"] for m in lines if "token" in m] == \
        reference_generate(model, fresh, 5, BT)


def test_small_caches_queue_requests_and_refuse_what_never_fits(stack: Stack, model: Transformer) -> None:
    prefill = stack.engine("prefill-small", "prefill", "--num-pages", "8")
    decode = stack.engine("decode-small", "decode", "--num-pages", "12")
    rng = random.Random(10)
    prompts = [tokens(rng, 100) for _ in range(4)]  # 7 pages each: one at a time fits

    async def run() -> list[list[int]]:
        async with aiohttp.ClientSession() as session:
            async def one(p: list[int]) -> list[int]:
                async with session.post(prefill + "/v1/prefill", json={"token_ids": p, "max_tokens": 8}) as r:
                    h = await r.json()
                async with session.post(decode + "/v1/decode", json=h) as r:
                    lines = [json.loads(raw) async for raw in r.content]
                assert lines[-1].get("done"), lines[-1]
                return [h["first_token"]] + [m["token"] for m in lines if "token" in m]
            return list(await asyncio.gather(*(one(p) for p in prompts)))

    for p, got in zip(prompts, asyncio.run(run())):
        assert got == reference_generate(model, p, 8, BT)
    with pytest.raises(urllib.error.HTTPError) as err:
        post(prefill + "/v1/prefill", {"token_ids": tokens(rng, 150), "max_tokens": 4})
    body = json.loads(err.value.read())
    assert err.value.code == 503 and body["error"] == "cache_full" and "10 KV pages needed" in body["message"]
    # through a router the client sees the same typed error, not an untyped internal one
    router = stack.engine("router-small", "router", "--prefill", prefill, "--decode", decode)

    async def refused() -> Generation:
        async with aiohttp.ClientSession() as session:
            return await generate(session, router, {"token_ids": tokens(rng, 150), "max_tokens": 4})

    g = asyncio.run(refused())
    assert g.tokens == [] and g.error is not None and "10 KV pages needed" in g.error
    assert g.error_code == "cache_full"
