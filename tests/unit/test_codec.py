"""The block header and the cold-tier codec."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import zstandard

from kvpool.codec import BlockHeader, Codec, DType, decode_cold, encode_cold, make_header, verify
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
