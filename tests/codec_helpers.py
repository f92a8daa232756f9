"""Builders and bitwise comparisons shared by the codec tests (``tests/test_codec*.py``) and the codec, mask and
freeze properties (``tests/properties/``)."""

from __future__ import annotations

import struct

import torch
from hypothesis import HealthCheck, settings

from fl_sparse.core.interfaces import Link, Message
from fl_sparse.parts.codecs import AutoSparse, DenseF32, FreezeAware, KnownMaskSparse, SparseBitmask, SparseIndices

UP = Link(direction="up", client_id=0, frozen={}, frozen_values={}, freeze_version=0)
LAYOUT_CODECS = {"dense": DenseF32, "bitmask": SparseBitmask, "indices": SparseIndices, "auto": AutoSparse}
ALL_CODECS = [DenseF32, SparseBitmask, SparseIndices, AutoSparse, FreezeAware, KnownMaskSparse]
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


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
