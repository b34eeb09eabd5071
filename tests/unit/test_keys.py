"""Block keys: the checked-in vector, the chain rule, and what separates namespaces."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import xxhash

from kvpool.errors import BadRequest
from kvpool.keys import Namespace, block_keys, parse_key

NS = Namespace(model_id="kvpool-test", dtype="float16", kv_layout="LHND", tp_rank=0,
               tp_world_size=1, block_tokens=4, salt="")
# Computed once and checked in: any change to the hashing scheme breaks this test, and must
# not happen silently, since every stored block would become unreachable.
ROOT = "2eb777ea4e02fe9202ef9f32569eb5c7"
VECTOR = ["4e4dcbcae5677db56bd7a4fd900a48e2", "333bde8f1198dc234d4284604aa93d2f"]


def test_checked_in_vector() -> None:
    assert NS.root().hex() == ROOT
    assert [k.hex() for k in block_keys(NS, list(range(10)))] == VECTOR


def test_chain_rule_from_the_spec() -> None:
    parent = bytes.fromhex(ROOT)
    for i, expected in enumerate(VECTOR):
        tokens = np.arange(4 * i, 4 * i + 4, dtype="<i4").tobytes()
        parent = xxhash.xxh3_128_digest(parent + tokens)
        assert parent.hex() == expected


def test_same_keys_in_another_process() -> None:
    code = ("from kvpool.keys import Namespace, block_keys\n"
            "ns = Namespace('kvpool-test', 'float16', 'LHND', 0, 1, 4, '')\n"
            "print(' '.join(k.hex() for k in block_keys(ns, range(10))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == VECTOR


def test_only_full_blocks_have_keys_and_prefixes_share_them() -> None:
    assert block_keys(NS, [1, 2, 3]) == []
    long = block_keys(NS, list(range(17)))
    assert len(long) == 4
    assert block_keys(NS, list(range(9))) == long[:2]


@pytest.mark.parametrize("change", [
    {"model_id": "other"}, {"dtype": "bfloat16"}, {"kv_layout": "HLND"}, {"tp_rank": 1, "tp_world_size": 2},
    {"tp_world_size": 2}, {"block_tokens": 2}, {"salt": "tenant-b"}])
def test_namespaces_never_share_keys(change: dict) -> None:
    fields = dict(model_id="kvpool-test", dtype="float16", kv_layout="LHND", tp_rank=0,
                  tp_world_size=1, block_tokens=4, salt="")
    other = Namespace(**{**fields, **change})
    assert not set(block_keys(other, range(16))) & set(block_keys(NS, range(16)))


def test_parse_key_and_bad_namespaces() -> None:
    key = block_keys(NS, range(4))[0]
    assert parse_key(key) == key == parse_key(key.hex())
    for bad in (b"short", key.hex()[:-1], "z" * 32, 12):
        with pytest.raises(BadRequest):
            parse_key(bad)  # type: ignore[arg-type]
    with pytest.raises(BadRequest):
        Namespace("m", "float16", "L", block_tokens=0)
    with pytest.raises(BadRequest):
        Namespace("m", "float16", "L", tp_rank=2, tp_world_size=2)
