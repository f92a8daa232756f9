"""Tests for fl_sparse.parts.codecs: bitwise roundtrips, exact sizes, FreezeAware. Malformed payloads are in
``tests/test_codec_payload_errors.py``; the shared builders in ``tests/codec_helpers.py``."""

from __future__ import annotations

import json
import time

import gin
import numpy as np
import pytest
import torch
from codec_helpers import (
    ALL_CODECS,
    FAST,
    LAYOUT_CODECS,
    UP,
    as_received,
    assert_bitwise_equal,
    assert_messages_equal,
    frozen_link,
    model_message,
    tiny_message,
)
from hypothesis import given
from hypothesis import strategies as st

from fl_sparse.core.errors import ConfigError, PayloadError
from fl_sparse.core.interfaces import Link, Message
from fl_sparse.parts.codecs import AutoSparse, DenseF32, FreezeAware, SparseBitmask, SparseIndices, expected_size
from fl_sparse.wire import layout as fmt

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
    assert codec.encode(message, link) == first  # encoding has no side effects: nothing was sent yet
    codec.delivered(link)  # the sender hands the payload over
    second = codec.encode(message, link)
    assert len(first) > len(second)
    assert codec.closed_form_size(message, link) == len(second)
    other_client = frozen_link("down", 4, message)
    assert codec.closed_form_size(message, other_client) == len(first)
    assert len(codec.encode(message, other_client)) == len(first)
    codec.delivered(other_client)
    for payload in (first, second):
        assert_messages_equal(codec.decode(payload, link), as_received(message))
    # The first payload carries the frozen values itself: a receiver without them still decodes it.
    blank = {name: torch.zeros_like(t) for name, t in message.tensors.items()}
    assert_messages_equal(codec.decode(first, Link("down", 3, link.frozen, blank, 1)), as_received(message))
    # A new frozen set (new version) is delivered again.
    newer = frozen_link("down", 3, message, version=2, seed=5)
    with_part = codec.encode(message, newer)
    codec.delivered(newer)
    assert len(with_part) > len(codec.encode(message, newer))
    assert codec.state_dict() == {"3": 2, "4": 1}


def test_freeze_aware_frozen_part_is_what_a_remote_receiver_keeps():
    """A receiver without the server's state (fl_sparse.flower's ClientApp) learns the frozen set and values
    from the first payload of a freeze version, and decodes the later ones with them alone."""
    message = model_message(0.4)
    codec, link = FreezeAware(), frozen_link("down", 3, message)
    first = codec.encode(message, link)
    codec.delivered(link)
    second = codec.encode(message, link)
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
        codec.delivered(link)


def test_freeze_aware_state_dict_roundtrips_through_json():
    message = model_message(0.4)
    codec = FreezeAware()
    link = frozen_link("down", 11, message)
    with_part = codec.encode(message, link)
    codec.delivered(link)
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
