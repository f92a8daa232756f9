"""Tests for fl_sparse.parts.codecs: bitwise roundtrips, exact sizes, FreezeAware, malformed payloads."""

from __future__ import annotations

import json
import struct
import time

import gin
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl_sparse.errors import ConfigError, PayloadError
from fl_sparse.interfaces import Link, Message
from fl_sparse.parts import payload_format as fmt
from fl_sparse.parts.codecs import (AutoSparse, DenseF32, FreezeAware, KnownMaskSparse, SparseBitmask,
                                    SparseIndices, expected_size)

UP = Link(direction="up", client_id=0, frozen={}, frozen_values={}, freeze_version=0)
LAYOUT_CODECS = {"dense": DenseF32, "bitmask": SparseBitmask, "indices": SparseIndices, "auto": AutoSparse}
ALL_CODECS = [DenseF32, SparseBitmask, SparseIndices, AutoSparse, FreezeAware, KnownMaskSparse]
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ------------------------------------------------------------------------------------------ helpers

def bits(tensor: torch.Tensor) -> torch.Tensor:
    """Raw bits, so that -0.0 != +0.0 and NaN payloads are compared exactly."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    return tensor.contiguous().view(ints[tensor.element_size()])


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(bits(actual), bits(expected))


def as_received(message: Message) -> Message:
    """What every codec must decode: masked tensors with all-zero bits (+0.0) outside the mask."""
    tensors = {}
    for name, tensor in message.tensors.items():
        mask = message.masks.get(name)
        tensors[name] = tensor if mask is None else \
            torch.where(mask, bits(tensor), torch.zeros_like(bits(tensor))).view(tensor.dtype)
    return Message(tensors=tensors, masks=dict(message.masks))


def assert_messages_equal(actual: Message, expected: Message) -> None:
    assert list(actual.tensors) == list(expected.tensors)
    assert set(actual.masks) == set(expected.masks)
    for name in expected.tensors:
        assert_bitwise_equal(actual.tensors[name], expected.tensors[name])
    for name in expected.masks:
        assert torch.equal(actual.masks[name], expected.masks[name])


def model_message(density: float, seed: int = 0) -> Message:
    """A small model-like message: masked conv and linear weights, dense biases, int64 buffer."""
    g = torch.Generator().manual_seed(seed)
    conv_mask = torch.rand(6, 3, 5, 5, generator=g) < density
    fc_mask = torch.rand(10, 20, generator=g) < density
    tensors = {
        "conv1.weight": torch.randn(6, 3, 5, 5, generator=g) * conv_mask,
        "conv1.bias": torch.randn(6, generator=g),
        "bn1.running_mean": torch.randn(6, generator=g),
        "bn1.num_batches_tracked": torch.tensor(123456789, dtype=torch.int64),
        "fc.weight": torch.randn(10, 20, generator=g) * fc_mask,
    }
    return Message(tensors=tensors, masks={"conv1.weight": conv_mask, "fc.weight": fc_mask})


def tiny_message() -> Message:
    mask = torch.tensor([[True, False, True], [False, False, True]])
    return Message(tensors={"w": torch.tensor([[1.5, 0.0, -2.0], [0.0, 0.0, 3.0]]), "b": torch.tensor([0.25])},
                   masks={"w": mask})


def frozen_link(direction: str, client_id: int, message: Message, version: int = 1, seed: int = 1):
    """Freezes about half of each masked tensor's coordinates, with the message's values."""
    g = torch.Generator().manual_seed(seed)
    frozen = {name: mask & (torch.rand(mask.shape, generator=g) < 0.5) for name, mask in message.masks.items()}
    return Link(direction=direction, client_id=client_id, frozen=frozen,
                frozen_values=dict(message.tensors), freeze_version=version)


def record(name: bytes = b"w", dtype: int = 0, wire: int = 0, dims=(4,), encoding: int = 1,
           body: bytes = b"") -> bytes:
    """One hand-written tensor record, to craft malformed payloads."""
    return (struct.pack("<H", len(name)) + name + struct.pack("<BBB", dtype, wire, len(dims))
            + struct.pack(f"<{len(dims)}I", *dims) + struct.pack("<B", encoding) + body)


def container(*records: bytes, codec_id: int = 4, count: int | None = None, magic=b"FLSP", version=1) -> bytes:
    return struct.pack("<4sBBI", magic, version, codec_id, len(records) if count is None else count) \
        + b"".join(records)


def f32(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


# ---------------------------------------------------------------------------------------- roundtrip

@pytest.mark.parametrize("codec_cls", ALL_CODECS)
@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_roundtrip_is_bitwise(codec_cls, density):
    message = model_message(density)
    codec = codec_cls()
    decoded = codec.decode(codec.encode(message, UP), UP)
    assert_messages_equal(decoded, as_received(message))
    assert decoded.tensors["bn1.num_batches_tracked"].dtype == torch.int64


@pytest.mark.parametrize("codec_cls", ALL_CODECS)
def test_special_float_values_survive_bitwise(codec_cls):
    patterns = [0x80000000, 0x00000001, 0x007FFFFF, 0x7F800000, 0xFF800000, 0x7FC00001, 0xFFC12345,
                0x7F800001, 0x7F7FFFFF, 0x3F800000]  # -0, subnormals, +-inf, NaN payloads, sNaN, max, 1
    values = torch.tensor(np.array(patterns, dtype=np.uint32).view(np.int32)).view(torch.float32)
    mask = torch.tensor([True] * 9 + [False])
    message = Message(tensors={"masked": values.clone(), "dense": values.clone()}, masks={"masked": mask})
    codec = codec_cls()
    decoded = codec.decode(codec.encode(message, UP), UP)
    assert_messages_equal(decoded, as_received(message))
    assert_bitwise_equal(decoded.tensors["dense"], values)


@pytest.mark.parametrize("codec_cls", ALL_CODECS)
def test_values_outside_the_mask_decode_as_positive_zero(codec_cls):
    message = Message(tensors={"w": torch.tensor([-0.0, 5.0, 7.0, float("nan")])},
                      masks={"w": torch.tensor([False, False, True, False])})
    decoded = codec_cls().decode(codec_cls().encode(message, UP), UP)
    assert_bitwise_equal(decoded.tensors["w"], torch.tensor([0.0, 0.0, 7.0, 0.0]))


@pytest.mark.parametrize("layout", sorted(LAYOUT_CODECS))
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_reduced_precision_wire_decodes_to_original_dtype(layout, dtype):
    message = model_message(0.3)
    message.tensors["half"] = torch.randn(7).half()
    codec = LAYOUT_CODECS[layout](dtype=dtype)
    payload = codec.encode(message, UP)
    assert len(payload) == codec.closed_form_size(message) < len(LAYOUT_CODECS[layout]().encode(message, UP))
    decoded = codec.decode(payload, UP)
    wire = getattr(torch, dtype)
    for name, expected in as_received(message).tensors.items():
        if expected.is_floating_point():
            assert_bitwise_equal(decoded.tensors[name], expected.to(wire).to(expected.dtype))
        else:
            assert_bitwise_equal(decoded.tensors[name], expected)


def test_other_dtypes_roundtrip():
    message = Message(tensors={"i32": torch.arange(-3, 3, dtype=torch.int32), "flag": torch.tensor([True, False]),
                               "u8": torch.tensor([0, 255], dtype=torch.uint8), "f64": torch.tensor([1 / 3]).double(),
                               "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 4)},
                      masks={"i32": torch.tensor([True, False, True, True, False, True]),
                             "empty": torch.zeros(0, 4, dtype=torch.bool)})
    for codec_cls in ALL_CODECS:
        decoded = codec_cls().decode(codec_cls().encode(message, UP), UP)
        expected = as_received(message)
        expected.tensors["f64"] = message.tensors["f64"].float().double()  # floats travel as float32
        assert_messages_equal(decoded, expected)


@FAST
@given(shape=st.lists(st.integers(1, 7), min_size=0, max_size=3), seed=st.integers(0, 2**31),
       density=st.sampled_from([0.0, 0.05, 0.3, 0.7, 1.0]))
def test_roundtrip_property(shape, seed, density):
    rng = np.random.default_rng(seed)
    raw = np.asarray(rng.integers(0, 2**32, size=tuple(shape), dtype=np.uint32))  # any bits, NaNs included
    tensor = torch.from_numpy(raw.view(np.int32)).view(torch.float32)
    mask = torch.from_numpy(np.asarray(rng.random(tuple(shape)) < density))
    message = Message(tensors={"t": tensor, "d": tensor.clone()}, masks={"t": mask})
    for codec_cls in ALL_CODECS:
        codec = codec_cls()
        payload = codec.encode(message, UP)
        assert_messages_equal(codec.decode(payload, UP), as_received(message))


# -------------------------------------------------------------------------------------------- sizes

def test_size_of_a_hand_computed_message():
    message = Message(tensors={"w": torch.ones(4, 5)}, masks={"w": torch.arange(20).reshape(4, 5) < 3})
    header, tensor_header = 10, 2 + 1 + 3 + 2 * 4 + 1
    assert len(SparseBitmask().encode(message, UP)) == header + tensor_header + 8 + 3 + 3 * 4
    assert len(SparseIndices().encode(message, UP)) == header + tensor_header + 8 + 3 * 4 + 3 * 4
    assert len(DenseF32().encode(message, UP)) == header + tensor_header + 3 + 20 * 4
    assert len(AutoSparse().encode(message, UP)) == header + tensor_header + 8 + 3 + 3 * 4  # tie -> bitmask


@pytest.mark.parametrize("density", [0.0, 0.02, 0.2, 0.6, 1.0])
def test_measured_size_equals_closed_form(density):
    message = model_message(density, seed=3)
    for layout, codec_cls in LAYOUT_CODECS.items():
        for dtype in ["float32", "float16"]:
            codec = codec_cls(dtype=dtype)
            size = len(codec.encode(message, UP))
            assert size == codec.closed_form_size(message) == expected_size(message, layout, dtype)
    codec = FreezeAware()
    assert len(codec.encode(message, UP)) == codec.closed_form_size(message, UP)


@FAST
@given(numel=st.integers(0, 300), count_fraction=st.floats(0, 1), seed=st.integers(0, 1000),
       dtype=st.sampled_from(["float32", "float16"]))
def test_auto_is_never_larger_than_any_single_layout(numel, count_fraction, seed, dtype):
    rng = np.random.default_rng(seed)
    mask = np.zeros(numel, dtype=bool)
    mask[rng.permutation(numel)[:round(count_fraction * numel)]] = True
    message = Message(tensors={"a": torch.randn(numel), "b": torch.randn(3)}, masks={"a": torch.from_numpy(mask)})
    sizes = {layout: len(cls(dtype=dtype).encode(message, UP)) for layout, cls in LAYOUT_CODECS.items()}
    assert sizes["auto"] == min(sizes.values())


def test_lenet_sized_message_is_fast():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(500, 1536, generator=g) < 0.2
    message = Message(tensors={"fc1.weight": torch.randn(500, 1536, generator=g) * mask,
                               "fc1.bias": torch.randn(500, generator=g)}, masks={"fc1.weight": mask})
    for codec in [AutoSparse(), SparseIndices(), DenseF32()]:
        codec.decode(codec.encode(message, UP), UP)  # warm-up
        start = time.perf_counter()
        codec.decode(codec.encode(message, UP), UP)
        assert time.perf_counter() - start < 0.25, codec  # a few ms normally; generous for slow CI


# -------------------------------------------------------------------------------------- FreezeAware

def test_freeze_aware_without_freezing_is_exactly_the_inner_codec():
    message = model_message(0.3)
    for inner in [AutoSparse(), SparseIndices(), DenseF32()]:
        assert FreezeAware(inner).encode(message, UP) == inner.encode(message, UP)
    assert FreezeAware().encode(message, UP) == AutoSparse().encode(message, UP)


def test_freeze_aware_uplink_sends_only_unfrozen_coordinates():
    message = model_message(0.4)
    link = frozen_link("up", 7, message)
    codec = FreezeAware()
    payload = codec.encode(message, link)
    assert len(payload) < len(AutoSparse().encode(message, UP))
    unfrozen = Message(tensors=message.tensors,
                       masks={name: mask & ~link.frozen[name] for name, mask in message.masks.items()})
    assert len(payload) == fmt.FREEZE_HEADER.size + AutoSparse().closed_form_size(unfrozen)
    assert len(payload) == codec.closed_form_size(message, link)
    assert_messages_equal(codec.decode(payload, link), as_received(message))
    # Frozen coordinates are not on the wire: the receiver takes them from its own frozen_values.
    marker = {name: torch.full_like(t, 42.0) for name, t in message.tensors.items()}
    decoded = codec.decode(payload, Link("up", 7, link.frozen, marker, 1))
    for name, frozen in link.frozen.items():
        assert torch.all(decoded.tensors[name][frozen] == 42.0)
        assert torch.equal(decoded.tensors[name][~frozen], as_received(message).tensors[name][~frozen])
    assert codec.state_dict() == {}  # the uplink never records deliveries


def test_freeze_aware_downlink_delivers_the_frozen_part_once_per_client_and_version():
    message = model_message(0.4)
    codec = FreezeAware()
    link = frozen_link("down", 3, message)
    first = codec.encode(message, link)
    second = codec.encode(message, link)
    assert len(first) > len(second)
    assert codec.closed_form_size(message, link) == len(second)
    other_client = frozen_link("down", 4, message)
    assert codec.closed_form_size(message, other_client) == len(first)
    assert len(codec.encode(message, other_client)) == len(first)
    for payload in (first, second):
        assert_messages_equal(codec.decode(payload, link), as_received(message))
    # The first payload carries the frozen values itself: a receiver without them still decodes it.
    blank = {name: torch.zeros_like(t) for name, t in message.tensors.items()}
    assert_messages_equal(codec.decode(first, Link("down", 3, link.frozen, blank, 1)), as_received(message))
    # A new frozen set (new version) is delivered again.
    newer = frozen_link("down", 3, message, version=2, seed=5)
    assert len(codec.encode(message, newer)) > len(codec.encode(message, newer))
    assert codec.state_dict() == {"3": 2, "4": 1}


def test_freeze_aware_frozen_part_is_what_a_remote_receiver_keeps():
    """A receiver without the server's state (fl_sparse.flower's ClientApp) learns the frozen set and values
    from the first payload of a freeze version, and decodes the later ones with them alone."""
    message = model_message(0.4)
    codec, link = FreezeAware(), frozen_link("down", 3, message)
    first, second = codec.encode(message, link), codec.encode(message, link)
    nothing = Link("down", 3, {}, {}, 1)
    part = codec.frozen_part(first, nothing)
    assert part.masks.keys() == link.frozen.keys()
    for name, frozen in link.frozen.items():
        assert torch.equal(part.masks[name], frozen)
        assert torch.equal(part.tensors[name][frozen], message.tensors[name][frozen])
    assert codec.frozen_part(second, nothing) is None
    assert codec.frozen_part(second, Link("down", 3, {}, {}, 0)) is None  # nothing frozen yet
    kept = Link("down", 3, part.masks, part.tensors, 1)
    assert_messages_equal(codec.decode(second, kept), as_received(message))


@FAST
@given(seed=st.integers(0, 1000), density=st.sampled_from([0.0, 0.2, 0.7, 1.0]),
       frozen_fraction=st.sampled_from([0.0, 0.3, 1.0]), direction=st.sampled_from(["up", "down"]),
       inner=st.sampled_from([AutoSparse, SparseIndices, DenseF32]))
def test_freeze_aware_roundtrip_property(seed, density, frozen_fraction, direction, inner):
    message = model_message(density, seed)
    g = torch.Generator().manual_seed(seed)
    frozen = {name: mask & (torch.rand(mask.shape, generator=g) < frozen_fraction)
              for name, mask in message.masks.items()}
    link = Link(direction, 5, frozen, message.tensors, 2)
    codec = FreezeAware(inner())
    for _ in range(2):  # on the downlink: first with the frozen part, then without
        size = codec.closed_form_size(message, link)
        payload = codec.encode(message, link)
        assert len(payload) == size
        assert_messages_equal(codec.decode(payload, link), as_received(message))


def test_freeze_aware_state_dict_roundtrips_through_json():
    message = model_message(0.4)
    codec = FreezeAware()
    link = frozen_link("down", 11, message)
    with_part = codec.encode(message, link)
    restored = FreezeAware()
    restored.load_state_dict(json.loads(json.dumps(codec.state_dict())))
    assert restored.state_dict() == {"11": 1}
    assert len(restored.encode(message, link)) < len(with_part)
    with pytest.raises(ConfigError):
        restored.load_state_dict({"eleven": 1})


def test_freeze_aware_ignores_frozen_tensors_the_message_does_not_mask():
    message = tiny_message()
    link = Link("down", 0, {"other": torch.ones(3, dtype=torch.bool)}, {"other": torch.ones(3)}, 1)
    codec = FreezeAware()
    payload = codec.encode(message, link)
    assert_messages_equal(codec.decode(payload, link), as_received(message))


def test_freeze_aware_rejects_mismatched_freeze_version_and_frozen_overlap():
    message = model_message(0.4)
    link = frozen_link("up", 1, message, version=3)
    payload = FreezeAware().encode(message, link)
    with pytest.raises(PayloadError, match="freeze version"):
        FreezeAware().decode(payload, frozen_link("up", 1, message, version=4))
    with pytest.raises(PayloadError):  # the receiver expects the inner codec's plain payload
        FreezeAware().decode(payload, UP)
    wider = {name: frozen | message.masks[name] for name, frozen in link.frozen.items()}
    with pytest.raises(PayloadError, match="frozen"):
        FreezeAware().decode(payload, Link("up", 1, wider, link.frozen_values, 3))


def test_freeze_aware_rejects_nested_or_foreign_inner():
    with pytest.raises(ConfigError):
        FreezeAware(FreezeAware())
    with pytest.raises(ConfigError):
        FreezeAware(inner="AutoSparse")
    with pytest.raises(ConfigError):
        SparseBitmask(dtype="int8")


def test_codecs_are_gin_configurable():
    gin.clear_config()  # an earlier test may have left a parsed (locked) config behind
    try:
        gin.parse_config(["SparseIndices.dtype = 'float16'", "FreezeAware.inner = @SparseBitmask()"])
        assert SparseIndices().dtype == "float16"
        assert isinstance(FreezeAware().inner, SparseBitmask)
    finally:
        gin.clear_config()


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


@pytest.mark.parametrize("codec_cls", ALL_CODECS)
@pytest.mark.parametrize("freeze_version", [0, 1])
def test_a_codec_that_claims_one_payload_for_every_client_gives_every_client_the_same_bytes(codec_cls,
                                                                                              freeze_version):
    message = model_message(0.4)
    codec = codec_cls()
    links = [frozen_link("down", client, message, version=freeze_version) if freeze_version
             else Link("down", client, {}, {}, 0) for client in range(3)]
    payloads = [codec.encode(message, link) for link in links]
    claims = [codec.same_for_every_client(link) for link in links]
    assert len(set(claims)) == 1
    if claims[0]:
        assert len(set(payloads)) == 1
    # FreezeAware after freezing owes each client the frozen part once: its payloads are per client.
    assert claims[0] == (codec_cls is not FreezeAware or freeze_version == 0)
