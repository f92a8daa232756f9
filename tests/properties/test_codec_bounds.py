"""Decoding is bounded by the receiver's model: real payloads of every codec, with inflated shapes, value counts and
record counts, duplicated or renamed records and changed dtypes, raise PayloadError, and no decode (tampered or
valid) allocates more than ``MEMORY_FACTOR`` times the model's size plus ``SLACK_BYTES``.

Memory is measured, not inferred: tracemalloc sees numpy's buffers (numpy reports them to it, calloc'ed ones too)
and Python objects, but not torch's CPU allocator, so :class:`TorchAllocations` adds the bytes of every tensor a
torch op creates that is not a view of its inputs (``Tensor.to`` conversions, for instance). The sum is an upper
bound of the decode's peak. ``tests/test_codec_schema.py`` also measures peak RSS in a fresh interpreter.

Runs under the ``ci`` and ``fuzz`` hypothesis profiles (``make fuzz``) like ``test_codec_fuzz.py``.
"""

from __future__ import annotations

import dataclasses
import struct
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fl_sparse.core.errors import PayloadError
from fl_sparse.core.interfaces import Link, Message, ModelSchema
from fl_sparse.parts.codecs import AutoSparse, DenseF32, FreezeAware, KnownMaskSparse, SparseBitmask, SparseIndices
from fl_sparse.wire import layout as fmt

pytestmark = pytest.mark.property

# A LeNet-like model (~63 KB): big enough that the slack below is small next to it.
SHAPES = {"conv1.weight": (6, 3, 5, 5), "conv1.bias": (6,), "bn1.running_mean": (6,), "conv2.weight": (16, 6, 5, 5),
          "fc.weight": (32, 400), "fc.bias": (32,)}
MASKED = ("conv1.weight", "conv2.weight", "fc.weight")
# A decode holds the values, the mask and, transiently, int64 positions of the masked coordinates (13 bytes per
# float32 element, ~3.3x the model); FreezeAware decodes two sections and merges them. 8x covers all of it.
MEMORY_FACTOR = 8
SLACK_BYTES = 64 << 10  # Python objects of the decode (names, dicts, the exception)
CASES = ["DenseF32", "SparseBitmask", "SparseIndices", "AutoSparse", "KnownMaskSparse-up", "FreezeAware-down",
         "FreezeAware-up"]
LAYOUT_CODECS = {"DenseF32": DenseF32, "SparseBitmask": SparseBitmask, "SparseIndices": SparseIndices,
                 "AutoSparse": AutoSparse}


# ------------------------------------------------------------------------------------------ measuring

class TorchAllocations(TorchDispatchMode):
    """Counts the bytes of every tensor a torch op creates, except views of its inputs."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        self.bytes += sum(t.untyped_storage().nbytes() for t in tree_leaves(out)
                          if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs)
        return out


with TorchAllocations():  # the first dispatch through a mode builds caches (~75 MB of Python objects) once
    torch.zeros(1).to(torch.float64)


def decode_measured(codec, payload: bytes, link: Link) -> tuple[Message | None, int]:
    """(the decoded message, or None on PayloadError; an upper bound of the bytes the decode allocated)."""
    torch_allocations = TorchAllocations()
    tracemalloc.start()
    try:
        with torch_allocations:
            try:
                decoded = codec.decode(payload, link)
            except PayloadError:
                decoded = None
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return decoded, peak + torch_allocations.bytes


SCHEMA = ModelSchema.of({name: torch.zeros(shape) for name, shape in SHAPES.items()}
                        | {"bn1.num_batches_tracked": torch.zeros((), dtype=torch.int64)})
MEMORY_BOUND = MEMORY_FACTOR * SCHEMA.nbytes + SLACK_BYTES


def test_the_meter_sees_numpy_and_torch_allocations():
    class Allocating:
        def decode(self, payload, link):
            np.zeros(10**7, dtype=np.uint8)  # calloc'ed, never touched: tracemalloc still counts it
            torch.zeros(10).to(torch.float64)
            return torch.ones(5 * 10**6, dtype=torch.uint8).view(torch.int8)  # a view is not counted again

    _, allocated = decode_measured(Allocating(), b"", None)
    assert 15 * 10**6 <= allocated < 16 * 10**6


# ------------------------------------------------------------------------------------ real payloads

@st.composite
def cases(draw) -> tuple[object, bytes, Link]:
    """(codec, a real payload of a model-like message, the receiving link with the model's schema)."""
    case = draw(st.sampled_from(CASES), label="case")
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1), label="seed"))
    density = draw(st.sampled_from([0.0, 0.01, 0.1, 0.5, 1.0]), label="density")
    masks = {name: torch.rand(SHAPES[name], generator=g) < density for name in MASKED}
    tensors = {name: torch.randn(shape, generator=g) for name, shape in SHAPES.items()}
    tensors = {name: t * masks[name] if name in masks else t for name, t in tensors.items()}
    tensors["bn1.num_batches_tracked"] = torch.tensor(7, dtype=torch.int64)
    message = Message(tensors, masks)
    frozen = {name: m & (torch.rand(m.shape, generator=g) < 0.5) for name, m in masks.items()}
    if case in LAYOUT_CODECS:
        link = Link("up", 0, {}, {}, 0, schema=SCHEMA)
        codec = LAYOUT_CODECS[case]()
    elif case == "KnownMaskSparse-up":
        link = Link("up", 0, {}, {}, 0, dict(masks), schema=SCHEMA)
        codec = KnownMaskSparse()
    else:
        link = Link(case.removeprefix("FreezeAware-"), 0, frozen, dict(tensors), 2, schema=SCHEMA)
        codec = FreezeAware()
    return codec, codec.encode(message, link), link


def test_without_the_schema_the_issue_12_payload_allocates_far_beyond_the_bound():
    """The meter sees the hole issue 12 found: without a schema, conv1.weight's header turned from (6, 3, 5, 5)
    into (2555910, 3, 5, 5) decodes, allocating what it claims (~0.9 GB); with the schema it is refused."""
    message = Message({"conv1.weight": torch.zeros(SHAPES["conv1.weight"])},
                      {"conv1.weight": torch.zeros(SHAPES["conv1.weight"], dtype=torch.bool)})
    link = Link("up", 0, {}, {}, 0, schema=SCHEMA)
    version, (container,) = split(SparseIndices().encode(message, link))
    container.records[0].dims[0] |= ISSUE_BYTE
    payload = join(version, [container])
    decoded, allocated = decode_measured(SparseIndices(), payload, dataclasses.replace(link, schema=None))
    assert decoded.tensors["conv1.weight"].shape == (2555910, 3, 5, 5) and allocated > 1000 * MEMORY_BOUND
    assert decode_measured(SparseIndices(), payload, link)[0] is None


# ----------------------------------------------------------------------- a payload, taken apart and put back

@dataclasses.dataclass
class Record:
    name: bytes
    dtype: int
    wire: int
    dims: list[int]
    encoding: int
    body: bytes

    def pack(self) -> bytes:
        return (fmt.NAME_LENGTH.pack(len(self.name)) + self.name
                + fmt.TENSOR_CODES.pack(self.dtype, self.wire, len(self.dims))
                + struct.pack(f"<{len(self.dims)}I", *self.dims) + fmt.ENCODING_CODE.pack(self.encoding) + self.body)


@dataclasses.dataclass
class Container:
    codec_id: int
    count: int
    records: list[Record]

    def pack(self) -> bytes:
        return (fmt.CONTAINER_HEADER.pack(fmt.MAGIC, fmt.FORMAT_VERSION, self.codec_id, self.count)
                + b"".join(record.pack() for record in self.records))


def parse_container(payload: bytes) -> Container:
    _, _, codec_id, count = fmt.CONTAINER_HEADER.unpack_from(payload)
    pos, records = fmt.CONTAINER_HEADER.size, []
    for _ in range(count):
        (length,) = fmt.NAME_LENGTH.unpack_from(payload, pos)
        name = payload[pos + 2:pos + 2 + length]
        pos += 2 + length
        dtype, wire, ndim = fmt.TENSOR_CODES.unpack_from(payload, pos)
        dims = list(struct.unpack_from(f"<{ndim}I", payload, pos + 3))
        pos += 3 + 4 * ndim
        (encoding,) = fmt.ENCODING_CODE.unpack_from(payload, pos)
        pos += 1
        numel = int(np.prod(dims))
        count_field = fmt.VALUE_COUNT.unpack_from(payload, pos)[0] if encoding in (1, 2, 4) else numel
        size = fmt.body_size(fmt.Encoding(encoding), numel, count_field, fmt.DTYPE_BY_CODE[wire].itemsize)
        records.append(Record(name, dtype, wire, dims, encoding, payload[pos:pos + size]))
        pos += size
    assert pos == len(payload)
    return Container(codec_id, count, records)


def split(payload: bytes) -> tuple[int | None, list[Container]]:
    """(FreezeAware's freeze version or None for a bare container, the containers inside)."""
    if payload[5] != fmt.FREEZE_AWARE_CODEC_ID:
        return None, [parse_container(payload)]
    _, _, _, flags, version, main_length = fmt.FREEZE_HEADER.unpack_from(payload)
    start = fmt.FREEZE_HEADER.size + (fmt.SECTION_LENGTH.size if flags else 0)
    sections = [payload[start:start + main_length]] + ([payload[start + main_length:]] if flags else [])
    return version, [parse_container(section) for section in sections]


def join(version: int | None, containers: list[Container]) -> bytes:
    """The payload again, with every length field consistent, so that only the mutation is wrong."""
    sections = [container.pack() for container in containers]
    if version is None:
        return sections[0]
    return fmt.pack_freeze_frame(version, sections[0], sections[1] if len(sections) > 1 else None)


# ------------------------------------------------------------------------------------------ mutations

MUTATIONS = ["dim", "ndim", "value count", "record count", "duplicate", "unknown name", "dtype"]
# Inflated dims: anything, the issue's byte written into a dim (6 -> 2555910), or a multiple up to 2**28 elements
# (within the schema-less max_elements, so only the schema stops it).
ISSUE_BYTE = 0x27 << 16


def inflated_dim(draw, dim: int, numel: int) -> int:
    multiple = st.integers(2, max(2, 2**28 // max(numel, 1))).map(lambda k: dim * k if dim else k)
    value = draw(st.one_of(st.integers(0, 2**32 - 1), st.just(dim | ISSUE_BYTE), multiple), label="dim value")
    return value if value != dim else dim + 1


@st.composite
def mutated(draw, payload: bytes) -> tuple[bytes, str]:
    """The payload with one mutation that makes it disagree with the receiver's model, every length field kept
    consistent; and the mutation's name."""
    version, containers = split(payload)
    container = draw(st.sampled_from(containers), label="section")
    kind = draw(st.sampled_from(MUTATIONS), label="mutation")
    if not container.records:
        kind = "record count"
    index = draw(st.integers(0, len(container.records) - 1), label="record") if container.records else 0
    record = container.records[index] if container.records else None
    if kind == "dim" and not record.dims:
        kind = "ndim"
    if kind == "value count" and record.encoding not in (1, 2, 4):
        kind = "dim" if record.dims else "ndim"
    if kind == "dim":
        position = draw(st.integers(0, len(record.dims) - 1), label="dim")
        record.dims[position] = inflated_dim(draw, record.dims[position], int(np.prod(record.dims)))
    elif kind == "ndim":
        if record.dims and draw(st.booleans(), label="drop a dim"):
            record.dims.pop(draw(st.integers(0, len(record.dims) - 1)))
        else:
            record.dims.insert(draw(st.integers(0, len(record.dims))), draw(st.integers(1, 2**32 - 1)))
    elif kind == "value count":
        (count,) = fmt.VALUE_COUNT.unpack_from(record.body)
        inflated = draw(st.one_of(st.integers(count + 1, 2**64 - 1), st.just(int(np.prod(record.dims)) + 1),
                                  st.just(2**64 - 1)), label="value count")
        record.body = fmt.VALUE_COUNT.pack(max(inflated, count + 1)) + record.body[fmt.VALUE_COUNT.size:]
    elif kind == "record count":
        container.count = draw(st.integers(len(container.records) + 1, 2**32 - 1), label="record count")
    elif kind == "duplicate":
        container.records.insert(draw(st.integers(0, len(container.records))), dataclasses.replace(record))
        container.count += 1
    elif kind == "unknown name":
        name = draw(st.text(min_size=1, max_size=12).filter(lambda n: n not in SCHEMA.tensors), label="name")
        record.name = name.encode()
        if draw(st.booleans(), label="huge too"):
            record.dims = [2**32 - 1] * len(record.dims)
    else:
        others = [code for code in (0, 1, 3, 4, 5, 6) if code != record.dtype]
        record.dtype = draw(st.sampled_from(others), label="dtype")
        record.wire = 0 if record.dtype in (0, 1, 2, 6) else record.dtype
    return join(version, containers), kind


@given(data=st.data())
def test_inflated_or_foreign_records_raise_payload_error_within_the_memory_bound(data):
    codec, payload, link = data.draw(cases())
    bad, kind = data.draw(mutated(payload))
    decoded, allocated = decode_measured(codec, bad, link)
    assert decoded is None, f"a payload with a changed {kind} decoded"
    assert allocated <= MEMORY_BOUND, (kind, allocated, MEMORY_BOUND)


@given(data=st.data())
def test_valid_payloads_decode_within_the_memory_bound(data):
    codec, payload, link = data.draw(cases())
    decoded, allocated = decode_measured(codec, payload, link)
    assert decoded is not None
    assert {name: (tuple(t.shape), t.dtype) for name, t in decoded.tensors.items()} == \
        {name: (spec.shape, spec.dtype) for name, spec in SCHEMA.tensors.items()}
    assert allocated <= MEMORY_BOUND, (allocated, MEMORY_BOUND)


@given(data=st.data())
def test_the_mutator_puts_an_unmutated_payload_back_together_byte_for_byte(data):
    _, payload, _ = data.draw(cases())
    assert join(*split(payload)) == payload
