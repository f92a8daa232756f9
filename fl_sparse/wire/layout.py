"""Low-level byte layout of fl_sparse payloads, format version 1.

The user-facing description (a table of every field) is at the top of :mod:`fl_sparse.parts.codecs`.
This module defines that layout, its exact sizes, and writes it; it does not decide which encoding a
tensor gets, the codecs pass that decision in. Everything is little-endian, written with :mod:`struct`
and numpy ``tobytes``. :mod:`fl_sparse.wire.decoding` reads it back.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
from typing import Callable, Mapping

import numpy as np
import torch

from fl_sparse.core.interfaces import Message

MAGIC = b"FLSP"
FORMAT_VERSION = 1
CONTAINER_HEADER = struct.Struct("<4sBBI")  # magic, format version, codec id, number of tensors
NAME_LENGTH = struct.Struct("<H")
TENSOR_CODES = struct.Struct("<BBB")  # dtype code, wire dtype code, ndim
ENCODING_CODE = struct.Struct("<B")
VALUE_COUNT = struct.Struct("<Q")
DIM_DTYPE = np.dtype("<u4")
INDEX_DTYPE = np.dtype("<u4")
INDEX_LIMIT = 2**32  # uint32 indices address at most this many elements
# FreezeAware framing: magic, version, codec id, flags, freeze version, main section length.
FREEZE_HEADER = struct.Struct("<4sBBBIQ")
FREEZE_FLAG_FROZEN_PART = 0x01
SECTION_LENGTH = struct.Struct("<Q")
# The optional scores section after the last tensor record (written only for a message with scores, so a payload
# without any is unchanged): magic, record count, then one tensor record per scored masked tensor, each under
# the mask of its non-zero scores.
SCORES_MAGIC = b"SCOR"
SCORE_COUNT = struct.Struct("<I")
SCORES_HEADER = struct.Struct("<4sI")  # SCORES_MAGIC, SCORE_COUNT

CODEC_NAMES = {1: "DenseF32", 2: "SparseBitmask", 3: "SparseIndices", 4: "AutoSparse", 5: "FreezeAware",
               6: "KnownMaskSparse"}
FREEZE_AWARE_CODEC_ID = 5


class Encoding(enum.IntEnum):
    """How one tensor's values are laid out (the per-tensor encoding code)."""

    DENSE = 0  # unmasked tensor: all values
    BITMASK = 1  # value count + packed mask + values of the masked coordinates
    INDICES = 2  # value count + uint32 flat indices + values of the masked coordinates
    DENSE_BITMASK = 3  # packed mask + all values (zero outside the mask)
    KNOWN_MASK = 4  # value count + values of the masked coordinates; the receiver already holds the mask


ENCODING_CODES = frozenset(int(e) for e in Encoding)


@dataclasses.dataclass(frozen=True)
class WireDtype:
    code: int
    torch_dtype: torch.dtype
    numpy_dtype: np.dtype  # little-endian numpy type with the same bits (bfloat16 rides as int16)

    @property
    def name(self) -> str:
        return str(self.torch_dtype).removeprefix("torch.")

    @property
    def itemsize(self) -> int:
        return self.numpy_dtype.itemsize


DTYPES = (
    WireDtype(0, torch.float32, np.dtype("<f4")),
    WireDtype(1, torch.float16, np.dtype("<f2")),
    WireDtype(2, torch.bfloat16, np.dtype("<i2")),
    WireDtype(3, torch.int64, np.dtype("<i8")),
    WireDtype(4, torch.int32, np.dtype("<i4")),
    WireDtype(5, torch.bool, np.dtype("u1")),  # one byte, 0 or 1 (checked on decode)
    WireDtype(6, torch.float64, np.dtype("<f8")),
    WireDtype(7, torch.int16, np.dtype("<i2")),
    WireDtype(8, torch.int8, np.dtype("i1")),
    WireDtype(9, torch.uint8, np.dtype("u1")),
)
DTYPE_BY_CODE = {d.code: d for d in DTYPES}
DTYPE_BY_TORCH = {d.torch_dtype: d for d in DTYPES}
FLOAT_WIRE_DTYPES = {d.name: d for d in DTYPES if d.torch_dtype in (torch.float32, torch.float16, torch.bfloat16)}

# Chooses the encoding of a masked tensor from (numel, number of masked values, wire itemsize).
EncodingChooser = Callable[[int, int, int], Encoding]


def wire_dtype_for(dtype: torch.dtype, float_wire: WireDtype) -> WireDtype:
    """Floating tensors travel as the codec's float type; everything else as its own dtype."""
    if dtype not in DTYPE_BY_TORCH:
        raise ValueError(f"cannot transmit tensors of dtype {dtype}; supported: "
                         f"{', '.join(d.name for d in DTYPES)}")
    return float_wire if dtype.is_floating_point else DTYPE_BY_TORCH[dtype]


def record_header_size(name_bytes: int, ndim: int) -> int:
    return NAME_LENGTH.size + name_bytes + TENSOR_CODES.size + DIM_DTYPE.itemsize * ndim + ENCODING_CODE.size


def body_size(encoding: Encoding, numel: int, count: int, itemsize: int) -> int:
    """Closed-form size of one tensor's body; ``count`` is the number of masked coordinates."""
    packed_mask = (numel + 7) // 8
    if encoding == Encoding.DENSE:
        return numel * itemsize
    if encoding == Encoding.BITMASK:
        return VALUE_COUNT.size + packed_mask + count * itemsize
    if encoding == Encoding.INDICES:
        return VALUE_COUNT.size + count * (INDEX_DTYPE.itemsize + itemsize)
    if encoding == Encoding.KNOWN_MASK:
        return VALUE_COUNT.size + count * itemsize
    return packed_mask + numel * itemsize


# Masks both ends already hold, by tensor name (KnownMaskSparse's uplink); None: none.
KnownMasks = Mapping[str, torch.Tensor] | None


def _is_known(known: KnownMasks, name: str, mask: torch.Tensor) -> bool:
    return known is not None and name in known and torch.equal(known[name].detach().cpu(), mask.detach().cpu())


def _record_size(name: str, tensor: torch.Tensor, mask: torch.Tensor | None, float_wire: WireDtype,
                 choose: EncodingChooser, known: KnownMasks) -> int:
    wire = wire_dtype_for(tensor.dtype, float_wire)
    numel = tensor.numel()
    header = record_header_size(len(name.encode("utf-8")), tensor.dim())
    if mask is None:
        return header + body_size(Encoding.DENSE, numel, numel, wire.itemsize)
    count = int(np.count_nonzero(mask.detach().cpu().numpy()))
    encoding = Encoding.KNOWN_MASK if _is_known(known, name, mask) else choose(numel, count, wire.itemsize)
    return header + body_size(encoding, numel, count, wire.itemsize)


def message_size(message: Message, float_wire: WireDtype, choose: EncodingChooser, known: KnownMasks = None) -> int:
    """Exact payload size from names, shapes and mask popcounts, without encoding anything."""
    total = CONTAINER_HEADER.size + sum(_record_size(name, tensor, message.masks.get(name), float_wire, choose, known)
                                        for name, tensor in message.tensors.items())
    if message.scores:
        total += SCORES_HEADER.size + sum(_record_size(name, score, score != 0, float_wire, choose, None)
                                          for name, score in message.scores.items())
    return total


# ----------------------------------------------------------------------------------------- encoding

def _to_wire_numpy(values: torch.Tensor, wire: WireDtype) -> np.ndarray:
    values = values.to(wire.torch_dtype)
    if wire.torch_dtype == torch.bfloat16:
        values = values.view(torch.int16)  # numpy has no bfloat16; the bits travel unchanged
    elif wire.torch_dtype == torch.bool:
        values = values.to(torch.uint8)
    return values.numpy().astype(wire.numpy_dtype, copy=False)


def encode_message(message: Message, codec_id: int, float_wire: WireDtype, choose: EncodingChooser,
                   known: KnownMasks = None) -> bytes:
    unknown = set(message.masks) - set(message.tensors)
    if unknown:
        raise ValueError(f"message has masks for tensors it does not carry: {sorted(unknown)}")
    parts = [CONTAINER_HEADER.pack(MAGIC, FORMAT_VERSION, codec_id, len(message.tensors))]
    for name, tensor in message.tensors.items():
        _encode_tensor(parts, name, tensor, message.masks.get(name), float_wire, choose, known)
    if message.scores:
        _check_scores(message)
        parts.append(SCORES_HEADER.pack(SCORES_MAGIC, len(message.scores)))
        for name, score in message.scores.items():
            _encode_tensor(parts, name, score, score != 0, float_wire, choose, None)
    return b"".join(parts)


def _check_scores(message: Message) -> None:
    for name, score in message.scores.items():
        tensor = message.tensors.get(name)
        if name not in message.masks or tensor is None:
            raise ValueError(f"message has scores for {name!r}, which it does not carry as a masked tensor")
        if score.shape != tensor.shape or score.dtype != tensor.dtype:
            raise ValueError(f"scores for {name!r} must be {tensor.dtype} of shape {tuple(tensor.shape)}, "
                             f"got {score.dtype} {tuple(score.shape)}")


def _encode_tensor(parts: list[bytes], name: str, tensor: torch.Tensor, mask: torch.Tensor | None,
                   float_wire: WireDtype, choose: EncodingChooser, known: KnownMasks) -> None:
    name_bytes = name.encode("utf-8")
    if len(name_bytes) > 0xFFFF or tensor.dim() > 255 or any(d >= 2**32 for d in tensor.shape):
        raise ValueError(f"tensor {name!r}: name longer than 65535 bytes, more than 255 dims or a dim >= 2**32")
    dtype, wire = DTYPE_BY_TORCH.get(tensor.dtype), wire_dtype_for(tensor.dtype, float_wire)
    flat = tensor.detach().reshape(-1).cpu()
    numel = flat.numel()
    if mask is None:
        encoding, body = Encoding.DENSE, [_to_wire_numpy(flat, wire).tobytes()]
    else:
        if mask.dtype != torch.bool or mask.shape != tensor.shape:
            raise ValueError(f"tensor {name!r}: mask must be bool of shape {tuple(tensor.shape)}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        # numpy rather than torch for selection: torch boolean indexing on CPU is ~10x slower here.
        mask_np = mask.detach().reshape(-1).cpu().numpy()
        selected = np.flatnonzero(mask_np)
        count = selected.size
        encoding = Encoding.KNOWN_MASK if _is_known(known, name, mask) else choose(numel, count, wire.itemsize)
        if encoding == Encoding.INDICES and numel > INDEX_LIMIT:
            raise ValueError(f"tensor {name!r} has {numel} elements, too many for uint32 indices")
        if encoding == Encoding.DENSE_BITMASK:
            # +0.0 outside the mask, so every codec decodes to the same tensor.
            dense = flat.masked_fill(~torch.from_numpy(mask_np), 0)
            body = [np.packbits(mask_np, bitorder="little").tobytes(), _to_wire_numpy(dense, wire).tobytes()]
        else:
            locator = (np.packbits(mask_np, bitorder="little") if encoding == Encoding.BITMASK
                       else selected.astype(INDEX_DTYPE) if encoding == Encoding.INDICES
                       else np.zeros(0, dtype=np.uint8))  # KNOWN_MASK: no locator on the wire
            values = _to_wire_numpy(flat, wire)[selected]
            body = [VALUE_COUNT.pack(count), locator.tobytes(), values.tobytes()]
    parts += [NAME_LENGTH.pack(len(name_bytes)), name_bytes,
              TENSOR_CODES.pack(dtype.code, wire.code, tensor.dim()),
              np.asarray(tensor.shape, dtype=DIM_DTYPE).tobytes(), ENCODING_CODE.pack(encoding), *body]


# ---------------------------------------------------------------------------- FreezeAware framing

def pack_freeze_frame(freeze_version: int, main: bytes, frozen_part: bytes | None) -> bytes:
    flags = FREEZE_FLAG_FROZEN_PART if frozen_part is not None else 0
    header = FREEZE_HEADER.pack(MAGIC, FORMAT_VERSION, FREEZE_AWARE_CODEC_ID, flags, freeze_version, len(main))
    if frozen_part is None:
        return header + main
    return b"".join([header, SECTION_LENGTH.pack(len(frozen_part)), main, frozen_part])
