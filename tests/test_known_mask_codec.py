"""KnownMaskSparse: on the uplink a tensor sent back under the trainable set the client received travels
without its mask; everything else is AutoSparse. Roundtrips stay bitwise and sizes stay closed-form."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from codec_helpers import (
    as_received,
    assert_bitwise_equal,
    assert_messages_equal,
    container,
    frozen_link,
    model_message,
    record,
)
from helpers import play, simulation

from fl_sparse.core.errors import PayloadError
from fl_sparse.core.interfaces import Link, Message
from fl_sparse.parts.codecs import AUTO_PREFERENCE as AUTO
from fl_sparse.parts.codecs import AutoSparse, FreezeAware, KnownMaskSparse
from fl_sparse.wire import layout as fmt


def uplink(message: Message, **changes) -> Link:
    link = Link(direction="up", client_id=3, frozen={}, frozen_values={}, freeze_version=0, mask=dict(message.masks))
    return dataclasses.replace(link, **changes)


@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 1.0])
def test_uplink_under_the_received_mask_drops_exactly_the_masks(density):
    message, codec = model_message(density), KnownMaskSparse()
    link = uplink(message)
    payload = codec.encode(message, link)
    assert_messages_equal(codec.decode(payload, link), as_received(message))
    saved = len(AutoSparse().encode(message, link)) - len(payload)
    auto_body = lambda m: min(fmt.body_size(e, m.numel(), int(m.sum()), 4) for e in AUTO)  # noqa: E731
    known_body = lambda m: fmt.body_size(fmt.Encoding.KNOWN_MASK, m.numel(), int(m.sum()), 4)  # noqa: E731
    assert saved == sum(auto_body(m) - known_body(m) for m in message.masks.values())
    assert len(payload) == codec.closed_form_size(message, link)


def test_special_float_values_survive_under_a_known_mask():
    patterns = [0x80000000, 0x00000001, 0x7F800000, 0xFFC12345, 0x3F800000]  # -0, subnormal, inf, NaN, 1
    values = torch.tensor(np.array(patterns, dtype=np.uint32).view(np.int32)).view(torch.float32)
    message = Message(tensors={"w": values.clone()}, masks={"w": torch.tensor([True, True, True, True, False])})
    codec, link = KnownMaskSparse(), uplink(message)
    decoded = codec.decode(codec.encode(message, link), link)
    assert_bitwise_equal(decoded.tensors["w"], as_received(message).tensors["w"])


def test_a_changed_mask_falls_back_to_autosparse_for_that_tensor_only():
    message, codec = model_message(0.3), KnownMaskSparse()
    changed = dict(message.masks)
    changed["fc.weight"] = ~message.masks["fc.weight"]  # the server's mask differs for fc.weight only
    link = uplink(message, mask=changed)
    payload = codec.encode(message, link)
    assert_messages_equal(codec.decode(payload, link), as_received(message))
    only_conv_known = uplink(message, mask={"conv1.weight": message.masks["conv1.weight"]})
    assert len(payload) == len(codec.encode(message, only_conv_known)) == codec.closed_form_size(message, link)


def test_downlink_is_autosparse_apart_from_the_codec_id():
    message = model_message(0.3)
    down = uplink(message, direction="down")
    payload, auto = KnownMaskSparse().encode(message, down), AutoSparse().encode(message, down)
    assert len(payload) == len(auto) and payload[:5] == auto[:5] and payload[6:] == auto[6:]
    assert payload[5] == KnownMaskSparse.codec_id and KnownMaskSparse().same_for_every_client(down)


def test_decoding_refuses_known_mask_tensors_it_cannot_place():
    body = fmt.VALUE_COUNT.pack(2) + np.array([1.0, 2.0], dtype="<f4").tobytes()
    payload = container(record(b"w", dims=(4,), encoding=4, body=body), codec_id=KnownMaskSparse.codec_id)
    codec = KnownMaskSparse()
    good = Link("up", 0, {}, {}, 0, {"w": torch.tensor([True, False, True, False])})
    assert codec.decode(payload, good).tensors["w"].tolist() == [1.0, 0.0, 2.0, 0.0]
    with pytest.raises(PayloadError, match="holds no mask"):
        codec.decode(payload, Link("up", 0, {}, {}, 0))
    with pytest.raises(PayloadError, match="known mask has 3 set bits"):
        codec.decode(payload, Link("up", 0, {}, {}, 0, {"w": torch.tensor([True, True, True, False])}))
    with pytest.raises(PayloadError, match="known mask of shape"):
        codec.decode(payload, Link("up", 0, {}, {}, 0, {"w": torch.ones(2, 2, dtype=torch.bool)}))
    with pytest.raises(PayloadError, match="holds no mask"):  # the downlink never uses a known mask
        codec.decode(payload, dataclasses.replace(good, direction="down"))
    with pytest.raises(PayloadError, match="not one this codec writes"):
        AutoSparse().decode(container(record(b"w", dims=(4,), encoding=4, body=body)), good)


def test_inside_freeze_aware_the_unfrozen_part_matches_the_received_trainable_set():
    message = model_message(0.6)
    link = dataclasses.replace(frozen_link("up", 2, message), mask=dict(message.masks))
    known, auto = FreezeAware(inner=KnownMaskSparse()), FreezeAware(inner=AutoSparse())
    payload = known.encode(message, link)
    assert len(payload) < len(auto.encode(message, link))
    assert_messages_equal(known.decode(payload, link), as_received(message))


def test_pffdst_with_known_masks_trains_identically_and_sends_less():
    runs = {}
    for inner in ("@AutoSparse()", "@KnownMaskSparse()"):
        sim = simulation("pffdst", f"FreezeAware.inner = {inner}", "TwoStage.readjust_every = 1", rounds=4)
        runs[inner] = list(play(sim))
    for (_, auto_state, auto_metrics), (_, known_state, known_metrics) in zip(*runs.values()):
        assert all(torch.equal(auto_state.weights[n], known_state.weights[n]) for n in auto_state.weights)
        assert known_metrics["uplink_bytes"] < auto_metrics["uplink_bytes"]
        assert known_metrics["downlink_bytes"] == auto_metrics["downlink_bytes"]
