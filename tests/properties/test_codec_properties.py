"""Properties of the communication codecs over generated messages: bitwise roundtrips of arbitrary float32 bit
patterns (-0.0, subnormals, inf, NaN payloads), exact closed-form sizes, AutoSparse's per-tensor optimality,
monotone sizes under nested masks and what FreezeAware saves in stage 2.

``tests/test_codecs.py`` covers hand-written cases and single-tensor properties; these use multi-tensor
messages with unicode names, zero-size and scalar tensors and non-float buffers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from codec_helpers import LAYOUT_CODECS, UP, bits
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fl_sparse.core.interfaces import Link, Message
from fl_sparse.parts.codecs import AutoSparse, FreezeAware, SparseIndices, expected_size
from fl_sparse.wire import layout as fmt

pytestmark = pytest.mark.property

SPARSE_LAYOUTS = ("bitmask", "indices", "auto")
# -0.0, smallest / largest subnormal, +-inf, quiet NaN with payload, negative NaN, signalling NaN, max, 1.0, +0.0
SPECIAL_BITS = [0x80000000, 0x00000001, 0x007FFFFF, 0x80000001, 0x7F800000, 0xFF800000, 0x7FC00001,
                0xFFC12345, 0x7F800001, 0x7F7FFFFF, 0x3F800000, 0x00000000]
float_bits = st.one_of(st.sampled_from(SPECIAL_BITS), st.integers(0, 2**32 - 1))
shapes = hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5)
names = st.text(min_size=0, max_size=6)


def float32_from_bits(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(array.astype(np.uint32).view(np.int32)).view(torch.float32)


@st.composite
def messages(draw, max_tensors: int = 4, extra_dtypes: bool = True) -> Message:
    """1-4 float32 tensors of arbitrary bits, each masked or dense, plus sometimes an int64 scalar buffer and a
    bool tensor. Values outside a mask are arbitrary too (the codecs must send +0.0 there)."""
    tensor_names = draw(st.lists(names, min_size=1, max_size=max_tensors, unique=True))
    tensors, masks = {}, {}
    for name in tensor_names:
        shape = draw(shapes)
        tensors[name] = float32_from_bits(draw(hnp.arrays(np.uint32, shape, elements=float_bits)))
        if draw(st.booleans()):
            density = draw(st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0]))
            masks[name] = torch.from_numpy(draw(hnp.arrays(np.bool_, shape, elements=st.booleans()
                                                           if density not in (0.0, 1.0) else st.just(density == 1.0))))
    if extra_dtypes and draw(st.booleans()):
        tensors["\0buffer"] = torch.tensor(draw(st.integers(-2**63, 2**63 - 1)), dtype=torch.int64)
    if extra_dtypes and draw(st.booleans()):
        flags = torch.from_numpy(draw(hnp.arrays(np.bool_, draw(shapes))))
        tensors["\0flags"] = flags
        if draw(st.booleans()):
            masks["\0flags"] = torch.from_numpy(draw(hnp.arrays(np.bool_, flags.shape)))
    return Message(tensors=tensors, masks=masks)


def frozen_subsets(draw, message: Message) -> dict[str, torch.Tensor]:
    """A frozen set inside the masks (some masked names left out)."""
    return {name: mask & torch.from_numpy(draw(hnp.arrays(np.bool_, mask.shape)))
            for name, mask in message.masks.items() if draw(st.booleans())}


def as_received(message: Message) -> Message:
    """What every codec must decode: masked tensors with all-zero bits outside the mask, the rest unchanged."""
    tensors = {}
    for name, tensor in message.tensors.items():
        mask = message.masks.get(name)
        tensors[name] = tensor if mask is None else torch.where(mask, bits(tensor), 0).view(tensor.dtype)
    return Message(tensors=tensors, masks=dict(message.masks))


def assert_bitwise_equal_messages(actual: Message, expected: Message) -> None:
    assert list(actual.tensors) == list(expected.tensors)
    assert actual.masks.keys() == expected.masks.keys()
    for name, tensor in expected.tensors.items():
        got = actual.tensors[name]
        assert got.dtype == tensor.dtype and got.shape == tensor.shape, name
        assert torch.equal(bits(got), bits(tensor)), name  # for float32 this is the .view(torch.int32) compare
    for name, mask in expected.masks.items():
        assert actual.masks[name].dtype == torch.bool and torch.equal(actual.masks[name], mask), name


def nested(draw, message: Message) -> Message:
    """The same tensors under masks that are subsets of the message's masks."""
    return Message(message.tensors, {name: mask & torch.from_numpy(draw(hnp.arrays(np.bool_, mask.shape)))
                                     for name, mask in message.masks.items()})


# -------------------------------------------------------------------------------------------- roundtrip

@given(message=messages())
def test_every_layout_codec_roundtrips_bitwise(message):
    expected = as_received(message)
    for codec in [cls() for cls in LAYOUT_CODECS.values()] + [FreezeAware(), FreezeAware(SparseIndices())]:
        assert_bitwise_equal_messages(codec.decode(codec.encode(message, UP), UP), expected)


@given(message=messages(), data=st.data(), direction=st.sampled_from(["up", "down"]),
       inner=st.sampled_from(sorted(LAYOUT_CODECS)), version=st.integers(1, 2**32 - 1))
def test_freeze_aware_roundtrips_bitwise_with_and_without_the_frozen_part(message, data, direction, inner, version):
    frozen = frozen_subsets(data.draw, message)
    link = Link(direction, 9, frozen, dict(message.tensors), version)
    codec = FreezeAware(LAYOUT_CODECS[inner]())
    expected = as_received(message)
    for _ in range(2):  # downlink: first payload carries the frozen part, the second relies on the link
        payload = codec.encode(message, link)
        assert_bitwise_equal_messages(codec.decode(payload, link), expected)
        codec.delivered(link)
    if direction == "down" and frozen:  # the first payload alone restores the frozen values
        blank = {name: torch.full_like(t, 7) for name, t in message.tensors.items()}
        fresh = FreezeAware(LAYOUT_CODECS[inner]())
        assert_bitwise_equal_messages(fresh.decode(fresh.encode(message, link), Link("down", 9, frozen, blank, version)),
                                      expected)


# ------------------------------------------------------------------------------------------------ sizes

@given(message=messages(), dtype=st.sampled_from(["float32", "float16", "bfloat16"]))
def test_payload_length_equals_the_closed_form(message, dtype):
    for layout, cls in LAYOUT_CODECS.items():
        codec = cls(dtype=dtype)
        assert len(codec.encode(message, UP)) == codec.closed_form_size(message) == expected_size(message, layout, dtype)


@given(message=messages(), data=st.data(), direction=st.sampled_from(["up", "down"]),
       inner=st.sampled_from(sorted(LAYOUT_CODECS)))
def test_freeze_aware_length_equals_its_closed_form(message, data, direction, inner):
    link = Link(direction, 4, frozen_subsets(data.draw, message), dict(message.tensors), 3)
    codec = FreezeAware(LAYOUT_CODECS[inner]())
    for _ in range(2):  # on the downlink: with the frozen part, then (delivered) without
        size = codec.closed_form_size(message, link)
        assert len(codec.encode(message, link)) == size
        codec.delivered(link)


def record_sizes(message: Message, cls) -> list[int]:
    return [len(cls().encode(Message({name: t}, {name: message.masks[name]} if name in message.masks else {}), UP))
            - fmt.CONTAINER_HEADER.size for name, t in message.tensors.items()]


@given(message=messages())
def test_auto_picks_the_smallest_layout_for_every_tensor(message):
    auto = len(AutoSparse().encode(message, UP))
    per_layout = {layout: record_sizes(message, cls) for layout, cls in LAYOUT_CODECS.items()}
    best = fmt.CONTAINER_HEADER.size + sum(min(sizes) for sizes in zip(*per_layout.values()))
    assert auto == best
    for layout, cls in LAYOUT_CODECS.items():
        assert auto <= len(cls().encode(message, UP)), layout


@given(message=messages(), data=st.data())
def test_bytes_never_grow_when_density_falls(message, data):
    sparser = nested(data.draw, message)
    sparsest = nested(data.draw, sparser)
    for layout, cls in LAYOUT_CODECS.items():
        sizes = [len(cls().encode(m, UP)) for m in (message, sparser, sparsest)]
        assert sizes[0] >= sizes[1] >= sizes[2], layout
        if layout == "dense":
            assert sizes[0] == sizes[2]  # dense + bitmask sends every value whatever the mask
    frozen = frozen_subsets(data.draw, sparsest)
    link = Link("up", 1, frozen, dict(message.tensors), 1)
    sizes = [len(FreezeAware().encode(m, link)) for m in (message, sparser, sparsest)]
    assert sizes[0] >= sizes[1] >= sizes[2]


@given(message=messages(extra_dtypes=False), data=st.data(), inner=st.sampled_from(sorted(LAYOUT_CODECS)))
def test_freeze_aware_stage_two_payload_is_not_larger_than_without_freezing(message, data, inner):
    """Stage 2: what is sent after the frozen part was delivered (every uplink, and each later downlink).
    It is the inner payload of the unfrozen coordinates plus a fixed frame; freezing F_t values of a tensor
    saves at least F_t * 4 - 8 bytes with a sparse inner codec (AutoSparse may switch from dense + bitmask to
    bitmask, which costs the 8-byte value count), so as soon as that exceeds the frame, freezing pays."""
    frozen = frozen_subsets(data.draw, message)
    no_freeze = len(LAYOUT_CODECS[inner]().encode(message, UP))
    for direction in ("up", "down"):
        codec = FreezeAware(LAYOUT_CODECS[inner]())
        link = Link(direction, 2, frozen, dict(message.tensors), 1)
        first = codec.encode(message, link)
        codec.delivered(link)
        stage_two = len(codec.encode(message, link))
        if direction == "down":
            assert len(first) >= stage_two  # the delivery of the frozen part is paid once
        assert stage_two <= no_freeze + fmt.FREEZE_HEADER.size
        if inner == "dense":
            assert stage_two == no_freeze + fmt.FREEZE_HEADER.size  # dense + bitmask saves nothing
            continue
        frozen_values = sum(int(f.sum()) for f in frozen.values())
        saving = sum(max(0, 4 * int(f.sum()) - 8) for f in frozen.values()) if inner == "auto" else 4 * frozen_values
        if saving >= fmt.FREEZE_HEADER.size:
            assert stage_two <= no_freeze
            assert stage_two <= no_freeze + fmt.FREEZE_HEADER.size - saving
