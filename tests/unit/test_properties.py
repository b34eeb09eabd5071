"""Property tests (hypothesis) of what crosses a boundary as bytes: block headers and cold
blobs (kvpool.codec), RPC frames and bodies (kvpool.wire, the stream RPC's framing, the
records of kvpool.protocol and kvpool.daemon_link) and block keys (kvpool.keys). Each
round-trips, and arbitrary bytes never crash a decoder: it answers a value or a typed
KVPoolError, never another exception (a TypeError would reach a caller as 'internal')."""

from __future__ import annotations

import asyncio
from typing import Any, Callable

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from kvpool import codec, keys, wire
from kvpool.codec import BlockHeader, Codec, ColdCodec, DType
from kvpool.daemon_link import (AdoptRequest, CopyRequest, DropRequest, PinMark, Registration,
                                SendItem, SendTarget, StoredBlock)
from kvpool.errors import BadRequest, KVPoolError, all_codes
from kvpool.protocol import (AbortRequest, AgentsRequest, Call, CommitRequest, CorruptRequest,
                             HeartbeatRequest, KeysRequest, ReadGrant, ReleaseRequest,
                             Reservation, ReserveRequest)
from kvpool.streamrpc import StreamRpcServer, _ServerConn

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
CODES = set(all_codes())

headers = st.builds(
    BlockHeader,
    dtype=st.sampled_from(list(DType)),
    shape=st.lists(st.integers(0, (1 << 64) - 1), max_size=8).map(tuple),
    layout=st.text(max_size=60).filter(lambda s: len(s.encode()) <= 255),
    payload_size=st.integers(0, (1 << 64) - 1),
    checksum=st.integers(0, (1 << 64) - 1),
    codec=st.sampled_from(list(Codec)),
    parent=st.none() | st.binary(min_size=16, max_size=16),
    scope=st.text(max_size=20).filter(lambda s: len(s.encode()) <= 64))

# msgpack values as the wire carries them (maps keyed by strings, as our bodies are)
values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 63), (1 << 64) - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20)
bodies = st.dictionaries(st.sampled_from(
    ["keys", "sizes", "parents", "prefer", "replicas", "ttl_s", "meta", "put_id", "headers",
     "leases", "nodes", "agents", "force", "prefix", "prefetch", "node_id", "agent", "release",
     "blocks", "tier", "src", "dst", "locations", "marks", "target", "items", "url", "metadata",
     "tiers", "inventory", "deadline_s", "mem_type", "device"]), values, max_size=6)


def typed_or_value(decode: Callable[[], Any]) -> None:
    """The decoder answers, or raises a KVPoolError whose code is on the wire table."""
    try:
        decode()
    except KVPoolError as exc:
        assert exc.code in CODES


# -- codec --------------------------------------------------------------------------------

@FAST
@given(headers)
def test_a_header_round_trips(header: BlockHeader) -> None:
    data = header.encode()
    back, used = BlockHeader.decode(data + b"trailing payload")
    assert used == len(data) and back == header


@FAST
@given(st.binary(max_size=200))
def test_arbitrary_bytes_never_crash_the_header_decoder(data: bytes) -> None:
    typed_or_value(lambda: BlockHeader.decode(data))
    typed_or_value(lambda: codec.decode_cold(data))


@FAST
@given(headers, st.data())
def test_a_damaged_header_decodes_or_is_a_typed_error(header: BlockHeader, data: st.DataObject) -> None:
    raw = bytearray(header.encode())
    at = data.draw(st.integers(0, len(raw) - 1))
    raw[at] ^= data.draw(st.integers(1, 255))
    typed_or_value(lambda: BlockHeader.decode(bytes(raw[:data.draw(st.integers(0, len(raw)))])))


@FAST
@given(st.sampled_from(list(DType)), st.binary(max_size=4096), st.sampled_from(list(Codec)),
       st.none() | st.binary(min_size=16, max_size=16))
def test_a_cold_blob_round_trips_with_either_codec(dtype: DType, payload: bytes, kind: Codec,
                                                   parent: bytes | None) -> None:
    header = codec.make_header(np.frombuffer(payload, np.uint8), dtype, parent=parent)
    blob = codec.encode_cold(header, payload, ColdCodec(kind))
    back, out = codec.decode_cold(blob)
    assert out == payload and back.checksum == header.checksum and back.codec is Codec.RAW
    assert codec.header_of_cold(blob).payload_size == len(payload)


@FAST
@given(st.binary(min_size=1, max_size=2048), st.sampled_from(list(Codec)), st.data())
def test_a_damaged_cold_blob_is_refused_typed_or_gives_the_original_bytes(
        payload: bytes, kind: Codec, data: st.DataObject) -> None:
    header = codec.make_header(np.frombuffer(payload, np.uint8), DType.UINT8)
    blob = bytearray(codec.encode_cold(header, payload, ColdCodec(kind)))
    at = data.draw(st.integers(0, len(blob) - 1))
    blob[at] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(blob)))
    try:
        _, out = codec.decode_cold(bytes(blob[:cut]))
    except KVPoolError as exc:
        assert exc.code in CODES
    else:
        assert out == payload  # never wrong bytes: a damage that decodes was harmless


# -- keys ---------------------------------------------------------------------------------

namespaces = st.builds(keys.Namespace, model_id=st.text(max_size=12), dtype=st.text(max_size=6),
                       kv_layout=st.text(max_size=6), block_tokens=st.integers(1, 8),
                       salt=st.text(max_size=6))


@FAST
@given(namespaces, st.lists(st.integers(-(1 << 31), (1 << 31) - 1), max_size=40))
def test_block_keys_chain_and_every_prefix_has_the_same_keys(ns: keys.Namespace, tokens: list[int]) -> None:
    got = keys.block_keys(ns, tokens)
    n = ns.block_tokens
    assert len(got) == len(tokens) // n and all(len(k) == keys.KEY_BYTES for k in got)
    parent = ns.root()
    for i, key in enumerate(got):
        assert key == keys.chain(parent, tokens[i * n:(i + 1) * n])
        parent = key
    for cut in range(0, len(tokens) + 1, max(1, n)):
        assert keys.block_keys(ns, tokens[:cut]) == got[:cut // n]


@FAST
@given(st.text(max_size=8), st.text(max_size=8))
def test_namespace_fields_cannot_run_together(a: str, b: str) -> None:
    one = keys.Namespace(a + b, "x", "y")
    two = keys.Namespace(a, b + "x", "y")
    assert (one.root() == two.root()) == (a + b == a and b + "x" == "x")


@FAST
@given(st.binary(min_size=16, max_size=16))
def test_a_key_parses_from_its_bytes_and_its_hex(key: bytes) -> None:
    assert keys.parse_key(key) == key
    assert keys.parse_key(key.hex()) == key
    assert keys.parse_key(key.hex().upper()) == key


@FAST
@given(st.binary(max_size=40) | st.text(max_size=40) | values)
def test_anything_else_is_a_bad_request_never_a_crash(value: Any) -> None:
    try:
        assert len(keys.parse_key(value)) == keys.KEY_BYTES
    except BadRequest:
        pass


# -- wire ---------------------------------------------------------------------------------

@FAST
@given(values)
def test_a_value_round_trips_through_the_wire(value: Any) -> None:
    back = wire.unpack(wire.pack(value))
    assert wire.pack(back) == wire.pack(value)  # equal bytes: NaN compares unequal to itself


MAP_KEYED_BY_ARRAY = b"\x81\x90\x00"  # {[]: 0}: valid msgpack no Python dict can hold


@FAST
@given(st.binary(max_size=300))
@example(MAP_KEYED_BY_ARRAY)
@example(b"\x93\x01\xa4echo" + MAP_KEYED_BY_ARRAY)
def test_arbitrary_bytes_never_crash_the_frame_decoders(data: bytes) -> None:
    typed_or_value(lambda: wire.unpack(data))
    typed_or_value(lambda: wire.split_frame(data, frozenset()))


@FAST
@given(st.integers(0, 1 << 40), st.sampled_from(list(Call)), bodies)
def test_a_frame_splits_into_its_parts(rid: int, name: Call, body: dict[str, Any]) -> None:
    got_rid, got_name, got_body = wire.split_frame(wire.pack([rid, name.value, body]), frozenset())
    assert (got_rid, got_name) == (rid, name.value)
    assert wire.pack(got_body) == wire.pack(body)


RECORDS: list[tuple[str, Callable[[Any], Any]]] = [
    ("reserve", ReserveRequest.unpack), ("commit", CommitRequest.unpack),
    ("abort", AbortRequest.unpack), ("release", ReleaseRequest.unpack),
    ("corrupt", CorruptRequest.unpack), ("agents", AgentsRequest.unpack),
    ("heartbeat", HeartbeatRequest.unpack), ("reservation", Reservation.unpack),
    ("grant", ReadGrant.unpack), ("registration", Registration.unpack),
    ("stored block", StoredBlock.unpack), ("pin mark", PinMark.unpack),
    ("copy", CopyRequest.unpack), ("drop", DropRequest.unpack), ("adopt", AdoptRequest.unpack),
    ("send item", SendItem.unpack), ("send target", SendTarget.unpack),
    *[(f"keys/{c.value}", (lambda c: lambda raw: KeysRequest.unpack(raw, c))(c)) for c in KeysRequest._OPTIONS],
]


@pytest.mark.parametrize("unpack", [u for _, u in RECORDS], ids=[n for n, _ in RECORDS])
@settings(max_examples=40, deadline=None)
@given(raw=bodies | values)
def test_every_record_decodes_arbitrary_input_or_refuses_it_typed(
        unpack: Callable[[Any], Any], raw: Any) -> None:
    typed_or_value(lambda: unpack(raw))


@FAST
@given(st.binary(min_size=16, max_size=16), st.integers(0, 1 << 31), st.floats(0, 1e11))
def test_a_pin_mark_round_trips(key: bytes, pins: int, soft_until: float) -> None:
    mark = PinMark(key, pins, soft_until)
    assert PinMark.unpack(wire.unpack(wire.pack(mark.pack()))) == mark


# -- the stream RPC's framing ------------------------------------------------------------

class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closed = False

    def write(self, data: Any) -> None:
        self.out += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1) if name == "peername" else default


async def _echo(body: dict[str, Any]) -> Any:
    return {"echo": len(body)}


def _answers(out: bytes) -> list[Any]:
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
    unpacker.feed(out)
    return list(unpacker)


@settings(max_examples=40, deadline=None)
@given(st.binary(max_size=300), st.booleans(), st.integers(1, 64))
@example(MAP_KEYED_BY_ARRAY, True, 64)
async def test_the_stream_server_answers_any_bytes_with_typed_frames(
        data: bytes, greet: bool, chunk: int) -> None:
    """Whatever arrives (split anyhow), the server answers typed frames or hangs up
    saying why; its protocol callbacks never raise."""
    conn = _ServerConn(StreamRpcServer({"echo": _echo}, eager=frozenset({"echo"})))
    transport = _Transport()
    conn.connection_made(transport)
    try:
        stream = (msgpack.packb({"kvpool": wire.PROTOCOL_VERSION}) if greet else b"") + data
        for at in range(0, len(stream), chunk):
            if transport.closed:
                break
            conn.data_received(stream[at:at + chunk])
        await asyncio.sleep(0)
        for answer in _answers(bytes(transport.out)):
            if isinstance(answer, dict):  # the hello back, or a refusal before hanging up
                assert "error" not in answer or answer["error"] in CODES
            else:
                rid, status, body = answer
                assert status == 0 or body["error"] in CODES, answer
                assert body.get("error") != KVPoolError.code, answer  # never 'internal'
    finally:
        conn.connection_lost(None)
