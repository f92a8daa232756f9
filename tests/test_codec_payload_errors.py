"""Malformed payloads: every truncation, bit flip, random or hand-crafted byte string either raises
PayloadError with a message naming what is wrong, or decodes to a well-formed message; never anything else,
and never a large allocation first. (Generated payloads at scale: ``tests/properties/test_codec_fuzz.py``.)"""

from __future__ import annotations

import struct
import time

import pytest
import torch
from codec_helpers import (
    ALL_CODECS,
    FAST,
    UP,
    assert_bitwise_equal,
    container,
    f32,
    model_message,
    record,
    tiny_message,
)
from hypothesis import given
from hypothesis import strategies as st

from fl_sparse.core.errors import ConfigError, PayloadError
from fl_sparse.core.interfaces import Link, Message
from fl_sparse.parts.codecs import AutoSparse, DenseF32, FreezeAware, SparseBitmask, SparseIndices, expected_size

# ------------------------------------------------------------------------------- malformed payloads

def small_payloads() -> dict[str, tuple]:
    """(codec, payload, link) for every codec, FreezeAware both plain and with a frozen part."""
    message = tiny_message()
    cases = {cls.__name__: (cls(), cls().encode(message, UP), UP) for cls in ALL_CODECS}
    link = Link("down", 0, {"w": torch.tensor([[True, False, False], [False, False, False]])},
                message.tensors, 1)
    cases["FreezeAware+part"] = (FreezeAware(), FreezeAware().encode(message, link), link)
    return cases


@pytest.mark.parametrize("case", sorted(small_payloads()))
def test_every_truncation_and_trailing_byte_raises_payload_error(case):
    codec, payload, link = small_payloads()[case]
    codec.decode(payload, link)
    for length in range(len(payload)):
        with pytest.raises(PayloadError):
            codec.decode(payload[:length], link)
    with pytest.raises(PayloadError, match="trailing"):
        codec.decode(payload + b"\0", link)


@pytest.mark.parametrize("case", sorted(small_payloads()))
def test_bit_flips_raise_payload_error_or_decode_cleanly(case):
    codec, payload, link = small_payloads()[case]
    for position in range(len(payload)):
        for bit in range(8):
            corrupted = bytearray(payload)
            corrupted[position] ^= 1 << bit
            try:
                decoded = codec.decode(bytes(corrupted), link)
            except PayloadError:
                continue
            for name, mask in decoded.masks.items():  # if it decodes, it is a well-formed message
                assert mask.shape == decoded.tensors[name].shape


@FAST
@given(garbage=st.binary(max_size=64))
def test_random_bytes_only_raise_payload_error(garbage):
    for codec in (AutoSparse(), DenseF32(), SparseIndices()):
        for payload in (garbage, b"FLSP\x01" + bytes([codec.codec_id]) + garbage):
            try:
                codec.decode(payload, UP)
            except PayloadError:
                pass


BITMASK_OK = record(b"w", dims=(4,), encoding=1, body=struct.pack("<Q", 2) + bytes([0b0101]) + f32(1, 2))


@pytest.mark.parametrize("payload, message", [
    (container(BITMASK_OK, magic=b"FLSQ"), "magic"),
    (container(BITMASK_OK, version=2), "version"),
    (container(BITMASK_OK, codec_id=99), "unknown codec id"),
    (container(BITMASK_OK, codec_id=3), "written by SparseIndices"),
    (container(BITMASK_OK, count=2), "truncated"),
    (container(BITMASK_OK, BITMASK_OK), "duplicate"),
    (container(record(b"\xff\xfe", encoding=0, body=f32(1, 2, 3, 4))), "UTF-8"),
    (container(record(dtype=42, encoding=0, body=f32(1, 2, 3, 4))), "unknown dtype"),
    (container(record(wire=1, encoding=0, body=f32(1, 2))), "travel as float16"),
    (container(record(encoding=9, body=f32(1, 2, 3, 4))), "unknown encoding"),
    (container(record(dims=(10**6, 10**6), encoding=0)), "elements"),
    (container(record(dims=(10**6, 10**6), encoding=2, body=struct.pack("<Q", 0))), "elements"),
    (container(record(encoding=1, body=struct.pack("<Q", 3) + bytes([0b0101]) + f32(1, 2, 3))), "set bits"),
    (container(record(encoding=1, body=struct.pack("<Q", 5) + bytes([0b0101]) + f32(1, 2, 3, 4, 5))), "5 values"),
    (container(record(encoding=1, body=struct.pack("<Q", 2) + bytes([0b10001]) + f32(1, 2))), "padding"),
    (container(record(encoding=2, body=struct.pack("<QII", 2, 1, 4) + f32(1, 2))), "out of range"),
    (container(record(encoding=2, body=struct.pack("<QII", 2, 2, 2) + f32(1, 2))), "strictly increasing"),
    (container(record(encoding=2, body=struct.pack("<QII", 2, 3, 1) + f32(1, 2))), "strictly increasing"),
    (container(record(encoding=3, body=bytes([0b0001]) + f32(1, 0, -0.0, 0))), "outside the mask"),
    (container(record(dtype=5, wire=5, dims=(2,), encoding=0, body=bytes([1, 2]))), "bool"),
    (container(record(encoding=2, body=struct.pack("<QII", 2, 0, 1) + f32(1))), "truncated: tensor 'w' values"),
])
def test_crafted_malformed_payloads(payload, message):
    with pytest.raises(PayloadError, match=message):
        AutoSparse().decode(payload, UP)


def test_crafted_valid_payload_decodes():
    decoded = AutoSparse().decode(container(BITMASK_OK), UP)
    assert_bitwise_equal(decoded.tensors["w"], torch.tensor([1.0, 0.0, 2.0, 0.0]))


@pytest.mark.parametrize("codec, encoding, body", [
    (DenseF32(max_elements=10**13), 0, b""),
    (DenseF32(max_elements=10**13), 3, b""),
    (SparseBitmask(max_elements=10**13), 1, struct.pack("<Q", 0)),
])
def test_absurd_element_count_fails_on_length_before_allocating_even_with_a_high_limit(codec, encoding, body):
    payload = container(record(dims=(10**6, 10**6), encoding=encoding, body=body), codec_id=codec.codec_id)
    start = time.perf_counter()
    with pytest.raises(PayloadError, match="truncated"):
        codec.decode(payload, UP)
    assert time.perf_counter() - start < 0.1


def test_truncation_error_names_the_tensor():
    payload = SparseBitmask().encode(model_message(0.5), UP)
    with pytest.raises(PayloadError, match=r"payload truncated: tensor 'fc.weight' values needs \d+ bytes, \d+ left"):
        SparseBitmask().decode(payload[:-10], UP)


def test_decode_rejects_non_bytes():
    with pytest.raises(PayloadError):
        AutoSparse().decode("FLSP", UP)


def test_encode_rejects_inconsistent_messages():
    with pytest.raises(ValueError, match="mask"):
        AutoSparse().encode(Message({"w": torch.ones(3)}, {"w": torch.ones(4, dtype=torch.bool)}), UP)
    with pytest.raises(ValueError, match="masks for tensors"):
        AutoSparse().encode(Message({}, {"w": torch.ones(4, dtype=torch.bool)}), UP)
    with pytest.raises(ValueError, match="dtype"):
        AutoSparse().encode(Message({"c": torch.ones(2, dtype=torch.complex64)}, {}), UP)
    with pytest.raises(ConfigError):
        expected_size(tiny_message(), "zip")
