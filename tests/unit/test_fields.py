"""Request decoding at the boundary: every wrong type, range or size is a typed error."""

from __future__ import annotations

import math

import msgpack
import pytest

from kvpool.errors import BadRequest, TooLarge
from kvpool.fields import MAX_KEYS
from kvpool.protocol import Call, CommitRequest, KeysRequest, ReserveRequest, released
from kvpool.wire import MAX_CALL_FRAME, split_frame

K = b"k" * 16


@pytest.mark.parametrize("body", [
    {"keys": [K], "sizes": [True]}, {"keys": [K], "sizes": [1.0]}, {"keys": [K], "sizes": [0]},
    {"keys": [K], "sizes": [1], "replicas": True}, {"keys": [K], "sizes": [1], "prefer": 5},
    {"keys": [K], "sizes": [1], "parents": 5}, {"keys": [K], "sizes": [1], "parents": [b"x"]},
    {"keys": [K], "sizes": [1, 2]}, {"keys": [K], "sizes": [1], "ttl_s": math.nan},
    {"keys": [K], "sizes": [1], "extra": 1}, {"sizes": [1]}, [K], None])
def test_a_bad_reserve_is_refused(body: object) -> None:
    with pytest.raises(BadRequest):
        ReserveRequest.unpack(body)


def test_good_requests_decode_and_round_trip() -> None:
    req = ReserveRequest([K], [4096], [None], prefer="n1", replicas=2, ttl_s=1.5)
    assert ReserveRequest.unpack(req.pack()) == req
    assert CommitRequest.unpack(CommitRequest(7, [K], [b"h"]).pack()).put_id == 7
    assert KeysRequest.unpack({"keys": [K.hex()], "force": False}, Call.REMOVE).keys == [K]
    assert released({"release": [1, 2]}) == [1, 2] and released({}) == []


def test_flags_are_booleans_and_options_belong_to_their_call() -> None:
    for bad in ({"keys": [K], "force": "no"}, {"keys": [K], "force": 1}):
        with pytest.raises(BadRequest):
            KeysRequest.unpack(bad, Call.REMOVE)
    with pytest.raises(BadRequest, match="unknown field"):
        KeysRequest.unpack({"keys": [K], "force": True}, Call.GET)
    with pytest.raises(BadRequest):
        released({"release": ["a"]})


def test_batches_and_frames_are_bounded() -> None:
    with pytest.raises(TooLarge, match=str(MAX_KEYS)):
        KeysRequest.unpack({"keys": [K] * (MAX_KEYS + 1)}, Call.EXISTS)
    big = msgpack.packb([3, "exists", {"keys": [K] * (MAX_CALL_FRAME // 16)}], use_bin_type=True)
    rid, name, body = split_frame(big, frozenset())
    assert (rid, name, type(body)) == (3, "exists", TooLarge)
    assert isinstance(split_frame(big, frozenset({"exists"}))[2], dict)
    for bad in (b"\x93\x01", msgpack.packb([1, "x", {}]) + b"\x00", msgpack.packb([1, 2, {}]),
                msgpack.packb([1, "x", []]), msgpack.packb({"a": 1}), b"\xc1"):
        with pytest.raises(BadRequest):
            split_frame(bad, frozenset())
