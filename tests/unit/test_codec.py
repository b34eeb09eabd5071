"""The block header and the cold-tier codec."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import zstandard

import struct

from kvpool.codec import (BlockHeader, Codec, ColdCodec, DType, decode_cold, encode_cold,
                          make_header, verify)
from kvpool.errors import BadRequest, ChecksumMismatch


def kv_like(n: int) -> np.ndarray:
    """Smooth values with a little noise, the way attention K/V looks."""
    x = np.linspace(0, 4, n, dtype=np.float32)
    return (np.sin(x) + 0.01 * np.random.default_rng(0).standard_normal(n)).astype(np.float16)


def test_header_round_trip_and_rejects() -> None:
    h = make_header(kv_like(1024), "float16", (2, 512), "LKHND")
    raw = h.encode()
    assert BlockHeader.decode(raw) == (h, len(raw))
    with pytest.raises(BadRequest):
        BlockHeader.decode(b"XXXX" + raw[4:])
    with pytest.raises(BadRequest):
        BlockHeader.decode(raw[:4] + bytes([9]) + raw[5:])  # a future format version
    with pytest.raises(BadRequest):
        BlockHeader.decode(raw[:10])


def test_the_parent_key_travels_in_the_header_and_version_1_blocks_still_read() -> None:
    parent = bytes(range(16))
    h = make_header(kv_like(256), "float16", layout="LKHND", parent=parent)
    raw = h.encode()
    assert BlockHeader.decode(raw)[0].parent == parent
    back, data = decode_cold(encode_cold(h, kv_like(256).tobytes()))
    assert back.parent == parent and data == kv_like(256).tobytes()
    # A block written by the previous format (version 1: no flags, no parent) still reads.
    v1 = bytearray(make_header(kv_like(256), "float16", layout="LKHND").encode())
    v1[4] = 1
    old, used = BlockHeader.decode(bytes(v1))
    assert old.parent is None and old.version == 1 and used == len(v1)
    with pytest.raises(BadRequest, match="flags"):  # version 1 had no flags
        BlockHeader.decode(bytes(v1[:10]) + struct.pack("<H", 1) + bytes(v1[12:]) + parent)
    with pytest.raises(BadRequest, match="16 bytes"):
        make_header(kv_like(4), "float16", parent=b"short").encode()


def test_the_scope_travels_in_the_header_and_version_2_blocks_still_read() -> None:
    h = dataclasses.replace(make_header(kv_like(256), "float16", parent=bytes(16)), scope="team-a")
    back, data = decode_cold(encode_cold(h, kv_like(256).tobytes()))
    assert back.scope == "team-a" and back.parent == bytes(16) and data == kv_like(256).tobytes()
    raw = h.encode()
    for cut in (len(raw) - 1, len(raw) - 7):  # the name or its length byte missing
        with pytest.raises(BadRequest, match="truncated"):
            BlockHeader.decode(raw[:cut])
    v2 = bytearray(make_header(kv_like(256), "float16", parent=bytes(16)).encode())
    v2[4] = 2
    old, used = BlockHeader.decode(bytes(v2))
    assert old.scope == "" and old.version == 2 and used == len(v2)
    v2[10] |= 2  # version 2 had no scope flag
    with pytest.raises(BadRequest, match="flags"):
        BlockHeader.decode(bytes(v2) + b"\x01a")
    with pytest.raises(BadRequest, match="64-byte scope"):
        dataclasses.replace(h, scope="x" * 65).encode()


def test_a_block_that_compresses_too_little_is_stored_raw() -> None:
    rng = np.random.default_rng(3)
    # Half smooth, half noise: zstd saves some, but less than a 60% threshold asks for.
    raw = np.concatenate([kv_like(8192).view(np.uint8),
                          rng.integers(0, 256, 16384, dtype=np.uint8)]).tobytes()
    header = make_header(raw, "float16")
    assert BlockHeader.decode(encode_cold(header, raw, ColdCodec(min_saving=0.0)))[0].codec == Codec.ZSTD_PLANES
    blob = encode_cold(header, raw, ColdCodec(min_saving=0.6))
    assert BlockHeader.decode(blob)[0].codec == Codec.RAW and decode_cold(blob)[1] == raw
    with pytest.raises(BadRequest):
        ColdCodec(level=40)


@pytest.mark.parametrize("payload,dtype", [
    (kv_like(4096), "float16"),
    (torch.randn(1024, dtype=torch.bfloat16).view(torch.uint8).numpy(), "bfloat16"),
    (np.random.default_rng(1).standard_normal(999).astype(np.float32), "float32"),
    (np.arange(1000, dtype=np.uint8), "uint8"),
    (np.arange(1001, dtype=np.uint8), "float16"),  # not a whole number of elements
])
def test_cold_round_trip(payload: np.ndarray, dtype: str) -> None:
    raw = payload.tobytes()
    header = make_header(raw, dtype)
    back, data = decode_cold(encode_cold(header, raw))
    assert data == raw and back == header


def test_byte_planes_compress_kv_better_than_plain_zstd() -> None:
    raw = kv_like(1 << 18).tobytes()
    blob = encode_cold(make_header(raw, "float16"), raw)
    plain = zstandard.ZstdCompressor(level=1).compress(raw)
    assert BlockHeader.decode(blob)[0].codec == Codec.ZSTD_PLANES
    assert len(blob) < 0.9 * len(plain) < len(raw)


def test_random_bytes_fall_back_to_raw() -> None:
    raw = np.random.default_rng(2).integers(0, 256, 65536, dtype=np.uint8).tobytes()
    blob = encode_cold(make_header(raw, "uint8"), raw)
    assert BlockHeader.decode(blob)[0].codec == Codec.RAW
    assert decode_cold(blob)[1] == raw


def test_damage_is_a_checksum_mismatch() -> None:
    raw = kv_like(8192).tobytes()
    header = make_header(raw, "float16")
    blob = bytearray(encode_cold(header, raw))
    blob[-10] ^= 0x40
    with pytest.raises(ChecksumMismatch):
        decode_cold(bytes(blob))
    with pytest.raises(ChecksumMismatch):
        decode_cold(bytes(blob[:-1000]))
    flipped = bytearray(raw)
    flipped[3] ^= 1
    with pytest.raises(ChecksumMismatch):
        verify(header, bytes(flipped))
    with pytest.raises(ChecksumMismatch):
        verify(header, raw[:-2])


def test_dtype_names() -> None:
    assert DType.parse("torch.bfloat16") is DType.BFLOAT16
    assert DType.parse("fp16") is DType.FLOAT16 and DType.parse("float32").itemsize == 4
    with pytest.raises(BadRequest):
        DType.parse("complex64")
