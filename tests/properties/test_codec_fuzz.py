"""Fuzzing the decoders: whatever bytes arrive, ``decode`` either returns a well-formed message or raises
:class:`PayloadError` -- never another exception, never a hang, never a huge allocation.

Every property is parametrised over the codec cases in ``CASES`` so that ``--hypothesis-show-statistics``
reports the examples run per codec. Inputs: random bytes (bare and behind a valid prefix), truncations and
trailing bytes of valid payloads, bit flips and byte overwrites of valid payloads, grammar-generated records
whose fields are each valid or arbitrary (wrong dtype / encoding codes, lying counts, unsorted or out-of-range
indices, set padding bits, non-zero values outside the mask, ...), wrong magic / version / codec id /
FreezeAware flags / freeze version, and absurd length fields (10**12 elements, 2**64 - 1 values, 2**32 - 1
tensors, 2**64 - 1 byte sections). Mutations of real payloads are decoded against the message's schema; crafted
records, whose names and shapes are arbitrary, without one (bounded by ``max_elements``). A message that does
decode must be well formed, of the receiver's model when it has a schema and, for the fixed-layout codecs,
canonical (re-encoding it gives back the same bytes). Inflated shapes, counts and record counts against a
schema, with measured memory, are in ``test_codec_bounds.py``.

The last tests plant a bug (one validation removed) and check that the default profile finds it.
"""

from __future__ import annotations

import dataclasses
import math
import struct
import time
import tracemalloc

import numpy as np
import pytest
import torch
from codec_helpers import UP, bits
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import HypothesisException
from hypothesis.extra import numpy as hnp

from fl_sparse.core.errors import PayloadError
from fl_sparse.core.interfaces import Link, Message, ModelSchema
from fl_sparse.parts.codecs import AutoSparse, DenseF32, FreezeAware, SparseBitmask, SparseIndices
from fl_sparse.wire import decoding as payload_decoding
from fl_sparse.wire import layout as fmt

pytestmark = pytest.mark.property

FREEZE_VERSION = 3
CASES = ["DenseF32", "SparseBitmask", "SparseIndices", "AutoSparse", "FreezeAware", "FreezeAware+frozen-up",
         "FreezeAware+frozen-down"]
LAYOUT_CODECS = {"DenseF32": DenseF32, "SparseBitmask": SparseBitmask, "SparseIndices": SparseIndices,
                 "AutoSparse": AutoSparse}
DECODE_SECONDS = 2.0  # a decode of these few-hundred-byte payloads takes well under a millisecond
ABSURD_PEAK_BYTES = 1 << 20  # numpy allocations (tracked by tracemalloc) while refusing an absurd header


# ------------------------------------------------------------------------------------------- strategies

small_shapes = hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4)


@st.composite
def small_messages(draw) -> Message:
    """1-3 small float32 tensors of arbitrary bits, most of them masked, sometimes an int64 buffer and a bool
    tensor."""
    tensors, masks = {}, {}
    for name in draw(st.lists(st.sampled_from(["w", "conv.weight", "b", "fc.weight", "é"]), min_size=1, max_size=3,
                              unique=True)):
        shape = draw(small_shapes)
        raw = draw(hnp.arrays(np.uint32, shape, elements=st.integers(0, 2**32 - 1)))
        tensors[name] = torch.from_numpy(raw.view(np.int32)).view(torch.float32)
        if draw(st.integers(0, 3)):
            masks[name] = torch.from_numpy(draw(hnp.arrays(np.bool_, shape)))
    if draw(st.booleans()):
        tensors["n"] = torch.tensor(draw(st.integers(-2**63, 2**63 - 1)), dtype=torch.int64)
    if draw(st.booleans()):
        tensors["flags"] = torch.from_numpy(draw(hnp.arrays(np.bool_, draw(small_shapes))))
        if draw(st.booleans()):
            masks["flags"] = torch.from_numpy(draw(hnp.arrays(np.bool_, tensors["flags"].shape)))
    return Message(tensors, masks)


def build_case(case: str, message: Message, draw) -> tuple[object, bytes, Link]:
    """(codec, a valid payload, the link to decode it with, carrying the message's schema) for one of ``CASES``."""
    up = dataclasses.replace(UP, schema=ModelSchema.of(message.tensors))
    if case in LAYOUT_CODECS:
        codec = LAYOUT_CODECS[case]()
        return codec, codec.encode(message, up), up
    if case == "FreezeAware":
        return FreezeAware(), FreezeAware().encode(message, up), up
    frozen = {name: mask & torch.from_numpy(draw(hnp.arrays(np.bool_, mask.shape)))
              for name, mask in message.masks.items()}
    direction = "up" if case.endswith("up") else "down"
    link = Link(direction, 1, frozen, dict(message.tensors), FREEZE_VERSION, schema=up.schema)
    return FreezeAware(), FreezeAware().encode(message, link), link  # a fresh downlink codec owes the frozen part


def decode_or_payload_error(codec, payload: bytes, link: Link) -> Message | None:
    """Decode; PayloadError -> None. Anything else (or a slow decode) fails the property."""
    start = time.perf_counter()
    try:
        decoded = codec.decode(payload, link)
    except PayloadError:
        decoded = None
    assert time.perf_counter() - start < DECODE_SECONDS, "decode took too long"
    return decoded


def assert_well_formed(codec, decoded: Message, link: Link, payload: bytes | None = None) -> None:
    """A message that decoded: masks are bool, shaped like their tensor, +0.0 outside; for the layout codecs
    re-encoding it and decoding again gives the same message bitwise. Given the ``payload`` it came from, the
    format must also be canonical: a fixed-layout codec re-encodes exactly those bytes (so a decoder that let
    set padding bits, duplicate or unsorted indices, stray values or trailing bytes through is caught) unless a
    float tensor claims a dtype other than float32 (its float32 wire values were converted); AutoSparse, which
    accepts any of its layouts, re-encodes to at most as many bytes."""
    assert isinstance(decoded, Message)
    assert set(decoded.masks) <= set(decoded.tensors)
    limit = getattr(codec, "inner", codec).max_elements
    assert all(t.numel() <= limit for t in decoded.tensors.values()), "a tensor beyond max_elements got through"
    if link.schema is not None:
        assert all((tuple(t.shape), t.dtype) == (link.schema.tensors[name].shape, link.schema.tensors[name].dtype)
                   for name, t in decoded.tensors.items()), "a tensor unlike the receiver's model got through"
    for name, tensor in decoded.tensors.items():
        assert isinstance(tensor, torch.Tensor)
        mask = decoded.masks.get(name)
        if mask is not None:
            assert mask.dtype == torch.bool and mask.shape == tensor.shape, name
            assert torch.all(bits(tensor)[~mask] == 0), name
    if not isinstance(codec, FreezeAware):
        again = codec.decode(codec.encode(decoded, link), link)
        assert list(again.tensors) == list(decoded.tensors)
        for name, tensor in decoded.tensors.items():
            assert again.tensors[name].dtype == tensor.dtype and torch.equal(bits(again.tensors[name]), bits(tensor))
        assert all(torch.equal(again.masks[name], mask) for name, mask in decoded.masks.items())
        if payload is not None:
            reencoded = codec.encode(decoded, link)
            if isinstance(codec, AutoSparse):
                assert len(reencoded) <= len(payload)
            elif all(t.dtype == torch.float32 for t in decoded.tensors.values() if t.is_floating_point()):
                assert reencoded == payload, "the decoder accepted a non-canonical payload"


def check_garbage(codec, payload: bytes, link: Link) -> None:
    decoded = decode_or_payload_error(codec, payload, link)
    if decoded is not None:
        assert_well_formed(codec, decoded, link, payload)


# ------------------------------------------------------------------------------------------- random bytes

@pytest.mark.parametrize("case", CASES)
@given(message=small_messages(), data=st.data(), garbage=st.binary(max_size=200))
def test_random_bytes_only_raise_payload_error(case, message, data, garbage):
    codec, valid, link = build_case(case, message, data.draw)
    keep = data.draw(st.sampled_from([0, 4, 5, 6, 10, 19, 27, len(valid)]), label="valid prefix length")
    check_garbage(codec, garbage, link)
    check_garbage(codec, valid[:keep] + garbage, link)


# ------------------------------------------------------------------------------ truncations and trailing

def check_truncation(codec, payload: bytes, link: Link, cut: int) -> None:
    assert cut < len(payload)
    decoded = decode_or_payload_error(codec, payload[:cut], link)
    assert decoded is None, f"a payload truncated to {cut} of {len(payload)} bytes decoded"


@pytest.mark.parametrize("case", CASES)
@given(message=small_messages(), data=st.data(), trailing=st.binary(min_size=1, max_size=16))
def test_truncations_and_trailing_bytes_raise_payload_error(case, message, data, trailing):
    codec, payload, link = build_case(case, message, data.draw)
    assert_well_formed(codec, codec.decode(payload, link), link)
    for cut in data.draw(st.lists(st.integers(0, len(payload) - 1), min_size=1, max_size=4), label="cuts"):
        check_truncation(codec, payload, link, cut)
    with pytest.raises(PayloadError):
        codec.decode(payload + trailing, link)


# ------------------------------------------------------------------------------ bit flips and overwrites

@st.composite
def mutations(draw, length: int) -> list[tuple[int, int]]:
    """1-4 (position, xor byte) pairs: single bit flips or whole-byte overwrites."""
    flips = st.tuples(st.integers(0, length - 1), st.sampled_from([1, 2, 4, 8, 16, 32, 64, 128]))
    overwrites = st.tuples(st.integers(0, length - 1), st.integers(1, 255))
    return draw(st.lists(st.one_of(flips, overwrites), min_size=1, max_size=4))


def mutate(payload: bytes, changes: list[tuple[int, int]]) -> bytes:
    corrupted = bytearray(payload)
    for position, xor in changes:
        corrupted[position] ^= xor
    return bytes(corrupted)


@pytest.mark.parametrize("case", CASES)
@given(message=small_messages(), data=st.data())
def test_bit_flips_raise_payload_error_or_decode_to_a_well_formed_message(case, message, data):
    codec, payload, link = build_case(case, message, data.draw)
    check_garbage(codec, mutate(payload, data.draw(mutations(len(payload)), label="mutations")), link)


# ------------------------------------------------------------------------------- grammar-generated records

ITEMSIZE = {d.code: d.itemsize for d in fmt.DTYPES}
FLOAT_CODES = {0, 1, 2, 6}
# Encodings each codec writes, masked ones first (0 = dense, for unmasked tensors); FreezeAware sections use
# AutoSparse.
WRITTEN = {"DenseF32": (3, 0), "SparseBitmask": (1, 0), "SparseIndices": (2, 0), "AutoSparse": (1, 2, 3, 0)}
NAMES = [b"w", b"b", b"fc.weight", "é".encode()]
# Hypothesis favours the first element of sampled_from (and 0 for integers), so the rare case goes last.
ONE_IN_TEN = st.sampled_from([False] * 9 + [True])
# At most one field of a record is made inconsistent; indices (at most numel of them) are drawn from
# [0, numel + 2] regardless, so out-of-range ones (a boundary case) come up on their own.
HEADER_FAULTS = ["name", "name length", "dtype", "wire", "ndim", "dims", "encoding", "body"]
BODY_FAULTS = {1: ["count", "padding"], 2: ["count", "unsorted"], 3: ["padding", "outside"]}  # by encoding


@st.composite
def crafted_record(draw, encodings: tuple[int, ...], name: bytes) -> bytes:
    """One tensor record, consistent except for at most one field: a header field or, more often, one that
    only its encoding (or the bool dtype) has, so that the deep checks get exercised."""
    dtype = draw(st.sampled_from([0, 3, 5, 6]), label="dtype")
    encoding = draw(st.sampled_from(encodings), label="encoding")
    faults = HEADER_FAULTS + 3 * (BODY_FAULTS.get(encoding, []) + (["values"] if dtype == 5 else []))
    fault = draw(st.sampled_from([None] * len(faults) + faults), label="fault")  # half of the records are clean
    if fault == "name":
        name = draw(st.binary(max_size=4), label="name")
    name_length = draw(st.integers(0, 0xFFFF)) if fault == "name length" else len(name)
    dtype = draw(st.integers(0, 255)) if fault == "dtype" else dtype
    wire = draw(st.integers(0, 255)) if fault == "wire" else (0 if dtype in FLOAT_CODES else dtype)
    dims = draw(st.lists(st.integers(0, 2**32 - 1) if fault == "dims" else st.integers(0, 4), max_size=3),
                label="dims")
    ndim = draw(st.integers(0, 255)) if fault == "ndim" else len(dims)
    encoding = draw(st.integers(0, 255)) if fault == "encoding" else encoding
    numel = math.prod(dims)
    itemsize = ITEMSIZE.get(wire, 4)
    head = (struct.pack("<H", name_length) + name + struct.pack("<BBB", dtype, wire, ndim)
            + struct.pack(f"<{len(dims)}I", *dims) + struct.pack("<B", encoding))
    if numel > 64:  # too big to write out: a short arbitrary body (must fail on length or on the header)
        return head + draw(st.binary(max_size=32), label="body")
    packed = (numel + 7) // 8
    mask_bytes = bytearray(draw(st.binary(min_size=packed, max_size=packed), label="packed mask"))
    if numel % 8:  # padding bits clear, unless that is the fault
        mask_bytes[-1] &= (1 << (numel % 8)) - 1
        if fault == "padding":
            mask_bytes[-1] |= 1 << draw(st.integers(numel % 8, 7), label="padding bit")
    mask = np.unpackbits(np.frombuffer(bytes(mask_bytes), np.uint8), bitorder="little")[:numel].astype(bool)

    def values(n: int) -> bytes:
        if wire == 5 and fault != "values":  # bool: bytes 0 / 1
            return bytes(draw(st.lists(st.integers(0, 1), min_size=n, max_size=n), label="values"))
        return draw(st.binary(min_size=n * itemsize, max_size=n * itemsize), label="values")

    def value_count(count: int) -> int:  # off by a little, or anything
        if fault != "count":
            return count
        return draw(st.one_of(st.integers(max(0, count - 2), count + 2), st.integers(0, 2**64 - 1)), label="count")

    if encoding == 0:
        body = values(numel)
    elif encoding == 1:
        count = value_count(int(mask.sum()))
        body = struct.pack("<Q", count) + bytes(mask_bytes) + values(min(count, 64))
    elif encoding == 2:
        positions = sorted(draw(st.sets(st.integers(0, numel + 2), min_size=min(numel, 1), max_size=numel),
                                label="indices"))
        if fault == "unsorted" and positions:
            positions = draw(st.permutations(positions + [draw(st.sampled_from(positions))]), label="shuffled")
        body = struct.pack(f"<Q{len(positions)}I", value_count(len(positions)), *positions) + values(len(positions))
    elif encoding == 3:
        dense = bytearray(values(numel))
        if fault != "outside":  # +0.0 outside the mask
            for i in np.flatnonzero(~mask):
                dense[i * itemsize:(i + 1) * itemsize] = bytes(itemsize)
        body = bytes(mask_bytes) + bytes(dense)
    else:
        body = draw(st.binary(max_size=16), label="body")
    if fault == "body":
        body = body[:draw(st.integers(0, max(len(body) - 1, 0)))] if draw(st.booleans()) else body + b"\0"
    return head + body


@st.composite
def crafted_container(draw, codec: str) -> bytes:
    codec_id = LAYOUT_CODECS[codec].codec_id
    names = draw(st.lists(st.sampled_from(NAMES), min_size=draw(ONE_IN_TEN, label="empty") ^ 1, max_size=3,
                          unique=True), label="names")
    if names and draw(ONE_IN_TEN, label="duplicate name"):
        names.append(names[0])
    records = [draw(crafted_record(WRITTEN[codec], name), label="record") for name in names]
    lie = draw(ONE_IN_TEN, label="header fault")
    count = draw(st.integers(0, 2**32 - 1)) if lie else len(records)
    found_id = draw(st.integers(0, 255)) if lie else codec_id
    return struct.pack("<4sBBI", b"FLSP", 1, found_id, count) + b"".join(records)


@st.composite
def crafted_payload(draw, case: str) -> bytes:
    if case in LAYOUT_CODECS:
        return draw(crafted_container(case))
    if case == "FreezeAware":
        return draw(crafted_container("AutoSparse"))
    main = draw(crafted_container("AutoSparse"), label="main section")
    part = draw(st.one_of(st.none(), crafted_container("AutoSparse")), label="frozen-part section")
    lie = draw(ONE_IN_TEN, label="frame fault")
    flags = draw(st.integers(0, 255)) if lie else (0 if part is None else 1)
    version = draw(st.integers(0, 2**32 - 1)) if lie else FREEZE_VERSION
    main_length = draw(st.integers(0, 2**64 - 1)) if lie else len(main)
    frame = fmt.FREEZE_HEADER.pack(b"FLSP", 1, 5, flags, version, main_length)
    if part is not None:
        frame += struct.pack("<Q", draw(st.integers(0, 2**64 - 1)) if lie else len(part))
    return frame + main + (part or b"")


def crafted_link(case: str) -> Link:
    if not case.startswith("FreezeAware+"):
        return UP
    frozen = {"w": torch.tensor([True, False, False, False]), "fc.weight": torch.zeros(2, 2, dtype=torch.bool)}
    values = {"w": torch.tensor([1.5, 0.0, 0.0, 0.0]), "fc.weight": torch.zeros(2, 2)}
    return Link("up" if case.endswith("up") else "down", 1, frozen, values, FREEZE_VERSION)


def codec_for(case: str):
    return LAYOUT_CODECS[case]() if case in LAYOUT_CODECS else FreezeAware()


@pytest.mark.parametrize("case", CASES)
@given(data=st.data())
def test_crafted_records_raise_payload_error_or_decode_to_a_well_formed_message(case, data):
    link = crafted_link(case)
    check_garbage(codec_for(case), data.draw(crafted_payload(case), label="payload"), link)


# ------------------------------------------------------------------------------ magic, version, codec id

@pytest.mark.parametrize("case", CASES)
@given(message=small_messages(), data=st.data(), magic=st.binary(min_size=4, max_size=4).filter(lambda m: m != b"FLSP"),
       version=st.integers(0, 255).filter(lambda v: v != 1), codec_id=st.integers(0, 255))
def test_wrong_magic_version_codec_id_or_frame_is_refused(case, message, data, magic, version, codec_id):
    codec, payload, link = build_case(case, message, data.draw)
    with pytest.raises(PayloadError, match="magic"):
        codec.decode(magic + payload[4:], link)
    with pytest.raises(PayloadError, match="version"):
        codec.decode(payload[:4] + bytes([version]) + payload[5:], link)
    if codec_id != payload[5]:
        with pytest.raises(PayloadError, match="codec id|written by"):
            codec.decode(payload[:5] + bytes([codec_id]) + payload[6:], link)
    if payload[5] == 5:  # a FreezeAware frame: unknown flag bits and another freeze version are refused too
        flags = data.draw(st.integers(2, 255), label="flags") | payload[6]
        with pytest.raises(PayloadError, match="flags"):
            codec.decode(payload[:6] + bytes([flags]) + payload[7:], link)
        other = data.draw(st.integers(0, 2**32 - 1).filter(lambda v: v != FREEZE_VERSION), label="freeze version")
        with pytest.raises(PayloadError, match="freeze version"):
            codec.decode(payload[:7] + struct.pack("<I", other) + payload[11:], link)


# ------------------------------------------------------------------------------------ absurd length fields

def absurd_record(dims: list[int], encoding: int, count: int) -> bytes:
    body = struct.pack("<Q", count) if encoding in (1, 2) else b""
    return (struct.pack("<H", 1) + b"w" + struct.pack("<BBB", 0, 0, len(dims)) + struct.pack(f"<{len(dims)}I", *dims)
            + struct.pack("<B", encoding) + body)


huge_dims = st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=8).filter(
    lambda dims: math.prod(max(d, 1) for d in dims) >= 10**12)


@pytest.mark.parametrize("case", CASES)
@given(dims=huge_dims, encoding=st.integers(0, 3), count=st.one_of(st.just(0), st.integers(0, 2**64 - 1)),
       tensor_count=st.one_of(st.just(1), st.just(2**32 - 1)), tail=st.binary(max_size=32),
       main_length=st.one_of(st.none(), st.just(2**64 - 1), st.integers(0, 2**64 - 1)))
def test_absurd_length_headers_are_refused_fast_without_allocating(case, dims, encoding, count, tensor_count, tail,
                                                                 main_length):
    """A header claiming >= 10**12 elements (or 2**64 - 1 values, 2**32 - 1 tensors, a 2**64 - 1 byte section)
    is refused with PayloadError in milliseconds, with at most ~1 MiB of numpy allocations."""
    codec_id = LAYOUT_CODECS[case].codec_id if case in LAYOUT_CODECS else AutoSparse.codec_id
    payload = struct.pack("<4sBBI", b"FLSP", 1, codec_id, tensor_count) + absurd_record(dims, encoding, count) + tail
    link = crafted_link(case)
    if case.startswith("FreezeAware+"):
        length = len(payload) if main_length is None else main_length
        payload = fmt.FREEZE_HEADER.pack(b"FLSP", 1, 5, 0, FREEZE_VERSION, length) + payload
    codec = codec_for(case)
    tracemalloc.start()
    try:
        start = time.perf_counter()
        with pytest.raises(PayloadError):
            codec.decode(payload, link)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 0.5 and peak < ABSURD_PEAK_BYTES, (elapsed, peak)


def test_a_huge_name_length_or_tensor_count_fails_on_length():
    for payload in (struct.pack("<4sBBI", b"FLSP", 1, 4, 2**32 - 1),
                    struct.pack("<4sBBIH", b"FLSP", 1, 4, 1, 0xFFFF) + b"w"):
        with pytest.raises(PayloadError, match="truncated"):
            AutoSparse().decode(payload, UP)


# ------------------------------------------------------------------------------------------ planted bugs
# Each removes one validation from the decoder and runs a property above with the example budget of the profile in
# force (``ci`` by default), to show the fuzzing would catch that regression. Seeds are derandomised so these
# tests cannot flake (over 1000 random seeds the ci budget found the truncation bug every time, at the first
# example, and the index bug 995 times, after a median of 9 examples); no example database; no shrinking, since
# only finding a failing example matters here.

def run_until_failure(prop) -> tuple[BaseException, int]:
    calls = []

    def counting(*args, **kwargs):
        calls.append(1)
        prop(*args, **kwargs)

    finder = settings(database=None, derandomize=True, report_multiple_bugs=False,
                      phases=[Phase.explicit, Phase.generate],
                      suppress_health_check=list(HealthCheck))(given(data=st.data())(counting))
    with pytest.raises(BaseException) as failure:
        finder()
    assert not isinstance(failure.value, (PayloadError, HypothesisException)), failure.value
    return failure.value, len(calls)


def test_planted_missing_truncation_check_is_found(monkeypatch):
    def take_unchecked(self, size, what):  # Reader.take without its bounds check
        chunk = self._view[self._pos:self._pos + size]
        self._pos += size
        return chunk

    monkeypatch.setattr(payload_decoding.Reader, "take", take_unchecked)

    def prop(data):  # the truncation property, over all codec cases at once
        case = data.draw(st.sampled_from(CASES))
        codec, payload, link = build_case(case, data.draw(small_messages()), data.draw)
        check_truncation(codec, payload, link, data.draw(st.integers(0, len(payload) - 1)))

    run_until_failure(prop)


def test_planted_missing_index_range_check_is_found(monkeypatch):
    def read_indices_unchecked(reader, count, numel, label):  # _read_indices without its range check
        indices = reader.array(fmt.INDEX_DTYPE, count, f"{label} indices")
        if count > 1 and not np.all(indices[1:] > indices[:-1]):
            raise PayloadError(f"{label}: indices are not strictly increasing")
        return indices.astype(np.intp)

    monkeypatch.setattr(payload_decoding, "_read_indices", read_indices_unchecked)

    def prop(data):  # the crafted-records property, as it runs for its SparseIndices case
        check_garbage(SparseIndices(), data.draw(crafted_payload("SparseIndices")), UP)

    error, _ = run_until_failure(prop)
    assert isinstance(error, IndexError), repr(error)  # numpy's out-of-bounds scatter, not a PayloadError
