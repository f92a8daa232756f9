"""Decoding fl_sparse payloads (layout: :mod:`fl_sparse.wire.layout`), bounded by the receiver's model.

Decoding trusts nothing. Before anything is allocated, every length is checked against the bytes that are left
and, when the receiver gives its :class:`~fl_sparse.core.interfaces.ModelSchema`, every record against its model: the
record count, the name (one of the model's, not repeated), the dtype, the shape, the value count and the index
range. No payload can then make the receiver allocate more than a small constant times its model's size
(``tests/properties/test_codec_bounds.py`` measures it). Without a schema only ``max_elements`` bounds a tensor.
Every inconsistency raises :class:`PayloadError` with one line naming the tensor. Slices of the payload are read
with ``numpy.frombuffer`` (zero-copy until the final tensor).
"""

from __future__ import annotations

import dataclasses
import math
import struct
from typing import Collection

import numpy as np
import torch

from fl_sparse.core.errors import PayloadError
from fl_sparse.core.interfaces import Message, ModelSchema, TensorSpec
from fl_sparse.wire.layout import (
    CODEC_NAMES,
    CONTAINER_HEADER,
    DIM_DTYPE,
    DTYPE_BY_CODE,
    ENCODING_CODE,
    ENCODING_CODES,
    FORMAT_VERSION,
    FREEZE_AWARE_CODEC_ID,
    FREEZE_FLAG_FROZEN_PART,
    FREEZE_HEADER,
    INDEX_DTYPE,
    MAGIC,
    NAME_LENGTH,
    SCORE_COUNT,
    SCORES_HEADER,
    SCORES_MAGIC,
    SECTION_LENGTH,
    TENSOR_CODES,
    VALUE_COUNT,
    Encoding,
    KnownMasks,
    WireDtype,
    wire_dtype_for,
)


@dataclasses.dataclass(frozen=True)
class Acceptance:
    """What a receiving codec accepts: its wire float type and masked encodings, and what the receiver knows."""

    float_wire: WireDtype
    masked_encodings: Collection[Encoding]
    max_elements: int  # bounds one tensor when there is no schema
    schema: ModelSchema | None = None  # the receiver's model; None: any name and shape up to max_elements
    known: KnownMasks = None  # masks the receiver already holds (KnownMaskSparse's uplink)


class Reader:
    """A cursor over the payload that refuses to read past its end."""

    def __init__(self, payload: bytes):
        try:
            self._view = memoryview(payload).cast("B")
        except TypeError:
            raise PayloadError(f"payload must be bytes, got {type(payload).__name__}") from None
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._view) - self._pos

    def take(self, size: int, what: str) -> memoryview:
        if size > self.remaining:
            raise PayloadError(f"payload truncated: {what} needs {size} bytes, {self.remaining} left")
        chunk = self._view[self._pos:self._pos + size]
        self._pos += size
        return chunk

    def unpack(self, layout: struct.Struct, what: str) -> tuple:
        return layout.unpack(self.take(layout.size, what))

    def array(self, dtype: np.dtype, count: int, what: str) -> np.ndarray:
        return np.frombuffer(self.take(count * dtype.itemsize, what), dtype=dtype)

    def expect_end(self) -> None:
        if self.remaining:
            raise PayloadError(f"payload has {self.remaining} trailing bytes after its last section")


def check_container(magic: bytes, version: int, codec_id: int, expected_codec_id: int, codec_name: str) -> None:
    if magic != MAGIC:
        raise PayloadError(f"not an fl_sparse payload: magic {magic!r}, expected {MAGIC!r}")
    if version != FORMAT_VERSION:
        raise PayloadError(f"unsupported payload format version {version}; this build reads {FORMAT_VERSION}")
    if codec_id != expected_codec_id:
        writer = CODEC_NAMES.get(codec_id)
        if writer is None:
            raise PayloadError(f"unknown codec id {codec_id}")
        raise PayloadError(f"payload was written by {writer} (codec id {codec_id}) but is decoded by {codec_name}")


def decode_message(payload: bytes, codec_id: int, accept: Acceptance) -> Message:
    reader = Reader(payload)
    magic, version, found_codec, tensor_count = reader.unpack(CONTAINER_HEADER, "header")
    check_container(magic, version, found_codec, codec_id, CODEC_NAMES[codec_id])
    if accept.schema is not None and tensor_count > len(accept.schema.tensors):
        raise PayloadError(f"payload claims {tensor_count} tensors, the receiver's model has "
                           f"{len(accept.schema.tensors)}")
    tensors, masks = {}, {}
    for index in range(tensor_count):  # no preallocation: without a schema a lying count runs out of bytes
        name, tensor, mask = _decode_tensor(reader, index, tensors, accept)
        tensors[name] = tensor
        if mask is not None:
            masks[name] = mask
    scores = _decode_scores(reader, tensors, masks, accept) if reader.remaining else {}
    reader.expect_end()
    return Message(tensors=tensors, masks=masks, scores=scores)


def _decode_scores(reader: Reader, tensors: dict, masks: dict, accept: Acceptance) -> dict:
    """The scores section: records checked against the masked tensors just decoded (name, dtype, shape) before
    anything is allocated, under no known mask."""
    trailing = reader.remaining
    if trailing < SCORES_HEADER.size or bytes(reader.take(len(SCORES_MAGIC), "scores magic")) != SCORES_MAGIC:
        raise PayloadError(f"payload has {trailing} trailing bytes after its last section (not a scores section)")
    (count,) = reader.unpack(SCORE_COUNT, "scores record count")
    if count > len(masks):
        raise PayloadError(f"scores section claims {count} records, the payload masks {len(masks)} tensors")
    accept = dataclasses.replace(accept, schema=ModelSchema.of({name: tensors[name] for name in masks}), known=None)
    scores = {}
    for index in range(count):
        name, score, _ = _decode_tensor(reader, index, scores, accept)
        scores[name] = score
    return scores


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _read_header(reader: Reader, index: int, seen: dict, accept: Acceptance):
    """(name, label, dtype, wire, shape) of the next record, checked against the schema before the dims
    are believed."""
    (name_length,) = reader.unpack(NAME_LENGTH, f"tensor #{index} name length")
    try:
        name = bytes(reader.take(name_length, f"tensor #{index} name")).decode("utf-8")
    except UnicodeDecodeError:
        raise PayloadError(f"tensor #{index}: name is not valid UTF-8") from None
    if name in seen:
        raise PayloadError(f"duplicate tensor name {name!r}")
    label = f"tensor {name!r}"
    spec: TensorSpec | None = None
    if accept.schema is not None:
        spec = accept.schema.tensors.get(name)
        if spec is None:
            raise PayloadError(f"{label}: the receiver's model has no tensor of that name")
    dtype_code, wire_code, ndim = reader.unpack(TENSOR_CODES, f"{label} dtype codes and ndim")
    dtype, wire = DTYPE_BY_CODE.get(dtype_code), DTYPE_BY_CODE.get(wire_code)
    if dtype is None or wire is None:
        raise PayloadError(f"{label}: unknown dtype code {dtype_code if dtype is None else wire_code}")
    if spec is not None and dtype.torch_dtype != spec.dtype:
        raise PayloadError(f"{label}: dtype {dtype.name}, the receiver's model has {_dtype_name(spec.dtype)}")
    expected_wire = wire_dtype_for(dtype.torch_dtype, accept.float_wire)
    if wire is not expected_wire:
        raise PayloadError(f"{label}: {dtype.name} values travel as {wire.name}, this codec sends them "
                           f"as {expected_wire.name}")
    if spec is not None and ndim != len(spec.shape):
        raise PayloadError(f"{label}: {ndim} dims, the receiver's model has shape {spec.shape}")
    shape = tuple(int(d) for d in reader.array(DIM_DTYPE, ndim, f"{label} dims"))
    if spec is not None and shape != spec.shape:
        raise PayloadError(f"{label}: shape {shape}, the receiver's model has {spec.shape}")
    # Zero-size dims do not excuse huge others: torch could not even compute the strides.
    if spec is None and math.prod(max(d, 1) for d in shape) > accept.max_elements:
        raise PayloadError(f"{label}: header claims shape {shape}, more than max_elements={accept.max_elements} "
                           "elements")
    return name, label, dtype, wire, shape


def _decode_tensor(reader: Reader, index: int, seen: dict, accept: Acceptance):
    name, label, dtype, wire, shape = _read_header(reader, index, seen, accept)
    numel = math.prod(shape)  # a Python int: an absurd header cannot overflow
    (encoding_code,) = reader.unpack(ENCODING_CODE, f"{label} encoding code")
    if encoding_code not in ENCODING_CODES:
        raise PayloadError(f"{label}: unknown encoding code {encoding_code}")
    encoding = Encoding(encoding_code)
    if encoding != Encoding.DENSE and encoding not in accept.masked_encodings:
        raise PayloadError(f"{label}: encoding {encoding.name} is not one this codec writes")

    mask = None
    if encoding == Encoding.DENSE:
        values = reader.array(wire.numpy_dtype, numel, f"{label} values").copy()
    elif encoding == Encoding.DENSE_BITMASK:
        mask = _read_bitmask(reader, numel, label)
        values = reader.array(wire.numpy_dtype, numel, f"{label} values").copy()
        bits = values.view(f"u{wire.itemsize}")  # compared as bits, so -0.0 outside the mask is refused
        if np.count_nonzero(bits) != np.count_nonzero(bits[np.flatnonzero(mask)]):
            raise PayloadError(f"{label}: non-zero values outside the mask")
    else:
        (count,) = reader.unpack(VALUE_COUNT, f"{label} value count")
        if count > numel:
            raise PayloadError(f"{label}: {count} values for a tensor of {numel} elements")
        if encoding in (Encoding.BITMASK, Encoding.KNOWN_MASK):
            mask = (_read_bitmask(reader, numel, label) if encoding == Encoding.BITMASK
                    else _known_mask(accept.known, name, shape, label))
            set_bits = int(np.count_nonzero(mask))
            if set_bits != count:
                what = "bitmask" if encoding == Encoding.BITMASK else "known mask"
                raise PayloadError(f"{label}: {what} has {set_bits} set bits but the header says {count} values")
            selector = np.flatnonzero(mask)  # integer scatter is ~3x faster than boolean assignment
        else:
            selector = _read_indices(reader, count, numel, label)
            mask = np.zeros(numel, dtype=bool)
            mask[selector] = True
        sent = reader.array(wire.numpy_dtype, count, f"{label} values")
        values = np.zeros(numel, dtype=wire.numpy_dtype)  # bit pattern 0 = +0.0 outside the mask
        values[selector] = sent
    if wire.torch_dtype == torch.bool and values.max(initial=0) > 1:
        raise PayloadError(f"{label}: bool values other than 0 and 1")
    tensor = _to_torch(values, wire, dtype).reshape(shape)
    return name, tensor, None if mask is None else torch.from_numpy(mask).reshape(shape)


def _known_mask(known: KnownMasks, name: str, shape: tuple[int, ...], label: str) -> np.ndarray:
    mask = None if known is None else known.get(name)
    if mask is None:
        raise PayloadError(f"{label}: sent under a known mask, but the receiver holds no mask for it")
    if tuple(mask.shape) != shape or mask.dtype != torch.bool:
        raise PayloadError(f"{label}: sent under a known mask of shape {shape}, but the receiver holds "
                           f"{mask.dtype} {tuple(mask.shape)}")
    return mask.detach().cpu().reshape(-1).numpy().copy()


def _read_bitmask(reader: Reader, numel: int, label: str) -> np.ndarray:
    packed = reader.array(np.dtype("u1"), (numel + 7) // 8, f"{label} bitmask")
    if numel % 8 and packed[-1] >> (numel % 8):
        raise PayloadError(f"{label}: padding bits of the last bitmask byte are set")
    return np.unpackbits(packed, count=numel, bitorder="little").view(bool)


def _read_indices(reader: Reader, count: int, numel: int, label: str) -> np.ndarray:
    indices = reader.array(INDEX_DTYPE, count, f"{label} indices")
    if count and int(indices[-1]) >= numel:
        raise PayloadError(f"{label}: index {int(indices[-1])} out of range for {numel} elements")
    if count > 1 and not np.all(indices[1:] > indices[:-1]):
        raise PayloadError(f"{label}: indices are not strictly increasing")
    return indices.astype(np.intp)


def _to_torch(values: np.ndarray, wire: WireDtype, dtype: WireDtype) -> torch.Tensor:
    native = values.astype(values.dtype.newbyteorder("="), copy=False)  # no-op on little-endian hosts
    tensor = torch.from_numpy(native)
    if wire.torch_dtype == torch.bfloat16:
        tensor = tensor.view(torch.bfloat16)
    elif wire.torch_dtype == torch.bool:
        tensor = tensor.to(torch.bool)
    return tensor if dtype is wire else tensor.to(dtype.torch_dtype)


def unpack_freeze_frame(payload: bytes, freeze_version: int) -> tuple[memoryview, memoryview | None]:
    """Splits a FreezeAware payload into (main section, frozen-part section or None)."""
    reader = Reader(payload)
    magic, version, codec_id, flags, found_version, main_length = reader.unpack(FREEZE_HEADER, "freeze header")
    check_container(magic, version, codec_id, FREEZE_AWARE_CODEC_ID, "FreezeAware")
    if flags & ~FREEZE_FLAG_FROZEN_PART:
        raise PayloadError(f"unknown FreezeAware flags 0x{flags:02x}")
    if found_version != freeze_version:
        raise PayloadError(f"payload was encoded for freeze version {found_version}, link has {freeze_version}")
    frozen_length = None
    if flags & FREEZE_FLAG_FROZEN_PART:
        (frozen_length,) = reader.unpack(SECTION_LENGTH, "frozen-part length")
    main = reader.take(main_length, "main section")
    frozen_part = None if frozen_length is None else reader.take(frozen_length, "frozen-part section")
    reader.expect_end()
    return main, frozen_part
