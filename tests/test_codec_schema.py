"""Decoding against the receiver's model (``Link.schema``): every record is checked for name, dtype, shape, value
count and index range, and the record count for duplicates and excess, before anything is allocated (issue 12).
The property tests with inflated payloads and measured memory are in ``tests/properties/test_codec_bounds.py``."""

from __future__ import annotations

import dataclasses
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from codec_helpers import (
    ALL_CODECS,
    as_received,
    assert_messages_equal,
    container,
    f32,
    frozen_link,
    model_message,
    record,
)
from helpers import play, simulation

from fl_sparse.core.errors import PayloadError
from fl_sparse.core.interfaces import Link, ModelSchema, TensorSpec
from fl_sparse.parts.codecs import AutoSparse, FreezeAware, KnownMaskSparse
from fl_sparse.wire import layout as fmt

SCHEMA = ModelSchema.of(model_message(0.5).tensors)  # conv1.weight (6, 3, 5, 5), conv1.bias, bn1.*, fc.weight
UP = Link("up", 0, {}, {}, 0, schema=SCHEMA)
# The record of tests.test_codecs.model_message's conv1.weight starts with its name; its first dim follows the
# three dtype/ndim bytes. Writing 0x27 into that dim's third byte turns 6 into 2555910 (issue 12's example).
CONV_NAME = b"conv1.weight"


def issue_payload() -> bytes:
    """An AutoSparse payload of a LeNet-like model whose conv1.weight header says (2555910, 3, 5, 5). At density
    0.02 that tensor travels as indices, which stay in range for the inflated shape."""
    payload = bytearray(AutoSparse().encode(model_message(0.02), UP))
    first_dim = payload.index(CONV_NAME) + len(CONV_NAME) + 3
    assert struct.unpack_from("<4IB", payload, first_dim) == (6, 3, 5, 5, 2)  # encoding 2: indices
    payload[first_dim + 2] = 0x27
    return bytes(payload)


def test_issue_12_mutated_header_decodes_without_a_schema_and_is_refused_with_one():
    without_schema = dataclasses.replace(UP, schema=None)
    assert AutoSparse().decode(issue_payload(), without_schema).tensors["conv1.weight"].shape == (2555910, 3, 5, 5)
    with pytest.raises(PayloadError, match=r"^tensor 'conv1.weight': shape \(2555910, 3, 5, 5\), the receiver's "
                                           r"model has \(6, 3, 5, 5\)$"):
        AutoSparse().decode(issue_payload(), UP)


W = Link("up", 0, {}, {}, 0, schema=ModelSchema({"w": TensorSpec((4,), torch.float32),
                                                  "n": TensorSpec((), torch.int64)}))
BITMASK_OK = record(body=struct.pack("<QB", 2, 0b0101) + f32(1, 2))


@pytest.mark.parametrize("payload, message", [
    (container(record(b"v", body=struct.pack("<QB", 0, 0))), r"^tensor 'v': the receiver's model has no tensor"),
    (container(BITMASK_OK, BITMASK_OK), r"^duplicate tensor name 'w'$"),
    (container(BITMASK_OK, count=3), r"^payload claims 3 tensors, the receiver's model has 2$"),
    (container(BITMASK_OK, count=2**32 - 1), r"^payload claims 4294967295 tensors"),
    (container(record(dtype=6, wire=0, body=b"")), r"^tensor 'w': dtype float64, the receiver's model has float32$"),
    (container(record(b"n", dtype=0, wire=0, dims=(), encoding=0, body=f32(1))), r"dtype float32, .* has int64$"),
    (container(record(dims=(2, 2))), r"^tensor 'w': 2 dims, the receiver's model has shape \(4,\)$"),
    (container(record(dims=(2**32 - 1,))), r"^tensor 'w': shape \(4294967295,\), the receiver's model has \(4,\)$"),
    (container(record(dims=(0,), body=struct.pack("<Q", 0))), r"shape \(0,\), the receiver's model has \(4,\)$"),
    (container(record(body=struct.pack("<Q", 5))), r"^tensor 'w': 5 values for a tensor of 4 elements$"),
    (container(record(encoding=2, body=struct.pack("<QI", 1, 4) + f32(1))), r"index 4 out of range for 4 elements$"),
    (container(record(body=struct.pack("<QB", 3, 0b0101) + f32(1, 2, 3))), r"bitmask has 2 set bits but .* 3 values$"),
])
def test_each_record_is_checked_against_the_receivers_model(payload, message):
    with pytest.raises(PayloadError, match=message):
        AutoSparse().decode(payload, W)


def test_a_payload_may_carry_a_subset_of_the_model():
    decoded = AutoSparse().decode(container(BITMASK_OK), W)  # like FreezeAware's frozen-part section
    assert decoded.tensors["w"].tolist() == [1.0, 0.0, 2.0, 0.0] and set(decoded.tensors) == {"w"}


@pytest.mark.parametrize("codec_cls", ALL_CODECS)
def test_every_codec_roundtrips_under_the_schema(codec_cls):
    message = model_message(0.3)
    for link in (dataclasses.replace(UP, mask=dict(message.masks)),
                 dataclasses.replace(frozen_link("down", 1, message), schema=SCHEMA),
                 dataclasses.replace(frozen_link("up", 1, message), schema=SCHEMA)):
        codec = codec_cls()
        assert_messages_equal(codec.decode(codec.encode(message, link), link), as_received(message))


def test_freeze_aware_checks_both_sections_against_the_schema():
    message = model_message(0.3)
    link = dataclasses.replace(frozen_link("down", 1, message), schema=SCHEMA)
    smaller = dataclasses.replace(link, schema=ModelSchema({name: spec for name, spec in SCHEMA.tensors.items()
                                                            if name != "bn1.running_mean"}))
    with pytest.raises(PayloadError, match=r"^main section: payload claims 5 tensors, the receiver's model has 4$"):
        FreezeAware().decode(FreezeAware().encode(message, link), smaller)
    payload = bytearray(FreezeAware().encode(message, link))  # a fresh codec owes the frozen-part section
    frozen_start = fmt.FREEZE_HEADER.size + fmt.SECTION_LENGTH.size + fmt.FREEZE_HEADER.unpack_from(payload)[5]
    struct.pack_into("<I", payload, payload.index(b"fc.weight", frozen_start) + len(b"fc.weight") + 3, 1000)
    with pytest.raises(PayloadError, match=r"^frozen-part section: tensor 'fc.weight': shape \(1000, 20\), the "
                                           r"receiver's model has \(10, 20\)$"):
        FreezeAware().decode(bytes(payload), link)


def test_known_mask_values_are_checked_against_the_schema_too():
    message = model_message(0.3)
    link = dataclasses.replace(UP, mask=dict(message.masks))
    payload = KnownMaskSparse().encode(message, link)
    other = ModelSchema({**SCHEMA.tensors, "fc.weight": TensorSpec((20, 10), torch.float32)})
    with pytest.raises(PayloadError, match=r"^tensor 'fc.weight': shape \(10, 20\), the receiver's model has "
                                           r"\(20, 10\)$"):
        KnownMaskSparse().decode(payload, dataclasses.replace(link, schema=other))


def test_the_engine_decodes_every_payload_against_the_global_models_schema():
    sim = simulation("pffdst", "TwoStage.readjust_every = 1", rounds=2)
    assert sim.schema == ModelSchema.of(sim.model.state_dict())
    links = []
    for codec in {id(c): c for c in (sim.experiment.downlink_codec, sim.experiment.uplink_codec)}.values():
        decode = codec.decode
        codec.decode = lambda payload, link, decode=decode: links.append(link) or decode(payload, link)
    list(play(sim))
    assert links and all(link.schema is sim.schema for link in links)


# The decode runs in a fresh interpreter, so that its peak RSS counts every allocator (numpy, torch, Python);
# a decoded tensor is touched the way the engine's NaN check would, so lazily zeroed pages count too.
RSS_SCRIPT = r"""
import dataclasses, resource, struct, sys
import torch
from fl_sparse.core.errors import PayloadError
from fl_sparse.parts.codecs import AutoSparse, SparseIndices
import test_codec_schema as t

link = t.UP if sys.argv[1] == "schema" else dataclasses.replace(t.UP, schema=None)
indices = bytearray(SparseIndices().encode(t.model_message(0.02), t.UP))
first_dim = indices.index(b"fc.weight") + len(b"fc.weight") + 3
struct.pack_into("<I", indices, first_dim, 10_000_000)  # fc.weight (10, 20) -> (10000000, 20): 2e8 elements
cases = [(AutoSparse(), t.issue_payload()), (SparseIndices(), bytes(indices))]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
refused = 0
for codec, payload in cases:
    try:
        decoded = codec.decode(payload, link)
    except PayloadError:
        refused += 1
        continue
    assert all(bool(torch.isfinite(tensor.float()).all()) for tensor in decoded.tensors.values())
    del decoded
print(refused, len(cases), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""
RSS_GROWTH_LIMIT_MIB = 32  # the model is 1.4 KB; this is allocator noise. Without a schema: 1338 MiB (measured).


def test_inflated_payloads_do_not_grow_the_receivers_peak_rss():
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": f"{tests}:{tests.parent}", "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", RSS_SCRIPT, "schema"], cwd=tests.parent, capture_output=True,
                         text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stderr
    refused, cases, growth_mib = run.stdout.split()
    assert refused == cases and float(growth_mib) < RSS_GROWTH_LIMIT_MIB, run.stdout
