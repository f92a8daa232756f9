"""Scores a client uploads beside its update (MaskPolicy.client_scores): the codecs' scores section, the server's
mean over uploads, and FedDST's second tie-break by the uploaded |gradient| (ClientReadjust.tie_break =
'votes_then_grad')."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import play, simulation

from fl_sparse.core.errors import PayloadError
from fl_sparse.core.interfaces import ClientResult, Link, Message, ModelSchema, Phase, RoundContext
from fl_sparse.core.rng import generator
from fl_sparse.engine.server import _mean_scores, _votes
from fl_sparse.parts.codecs import AutoSparse, DenseF32, FreezeAware, KnownMaskSparse, SparseBitmask, SparseIndices
from fl_sparse.parts.mask_policies import ClientReadjust
from fl_sparse.wire.layout import SCORES_HEADER


def _message() -> Message:
    g = torch.Generator().manual_seed(0)
    weights = {"conv.weight": torch.randn(4, 3, generator=g), "conv.bias": torch.randn(4, generator=g),
               "fc.weight": torch.randn(5, 6, generator=g)}
    masks = {"conv.weight": torch.rand(4, 3, generator=g) < 0.5, "fc.weight": torch.rand(5, 6, generator=g) < 0.3}
    for name, mask in masks.items():
        weights[name] = torch.where(mask, weights[name], torch.zeros(()))
    grown = ~masks["fc.weight"] & (torch.rand(5, 6, generator=g) < 0.2)
    scores = {"fc.weight": torch.where(grown, torch.rand(5, 6, generator=g) + 0.1, torch.zeros(()))}
    return Message(weights, masks, scores)


def _link(message: Message, direction: str = "up") -> Link:
    return Link(direction, 3, {}, {}, 0, message.masks, ModelSchema.of(message.tensors))


CODECS = [DenseF32(), SparseBitmask(), SparseIndices(), AutoSparse(), KnownMaskSparse(), FreezeAware()]


@pytest.mark.parametrize("codec", CODECS, ids=lambda codec: type(codec).__name__)
def test_scores_travel_exactly_and_add_their_section_to_the_bytes(codec):
    message = _message()
    link = _link(message)
    payload = codec.encode(message, link)
    without = codec.encode(dataclasses.replace(message, scores={}), link)
    decoded = codec.decode(payload, link)
    assert decoded.scores.keys() == {"fc.weight"}
    assert torch.equal(decoded.scores["fc.weight"], message.scores["fc.weight"])
    assert all(torch.equal(decoded.tensors[name], tensor) for name, tensor in message.tensors.items())
    sent = int((message.scores["fc.weight"] != 0).sum())
    assert len(payload) - len(without) > SCORES_HEADER.size + 4 * sent  # header, record, values: counted bytes
    assert payload.startswith(without[:8])  # same container: a message without scores is unchanged
    assert codec.decode(without, link).scores == {}
    if hasattr(codec, "closed_form_size"):
        size = codec.closed_form_size(message, link) if isinstance(codec, (FreezeAware, KnownMaskSparse)) \
            else codec.closed_form_size(message)
        assert size == len(payload)


def test_a_frozen_run_keeps_the_scores_outside_the_frozen_part():
    message = _message()
    frozen = {name: mask & (torch.arange(mask.numel()).view_as(mask) % 2 == 0) for name, mask in message.masks.items()}
    link = Link("up", 3, frozen, message.tensors, 1, message.masks, ModelSchema.of(message.tensors))
    codec = FreezeAware()
    decoded = codec.decode(codec.encode(message, link), link)
    assert torch.equal(decoded.scores["fc.weight"], message.scores["fc.weight"])
    assert codec.closed_form_size(message, link) == len(codec.encode(message, link))


def test_scores_only_for_masked_tensors_of_the_receivers_model():
    message = _message()
    with pytest.raises(ValueError, match="does not carry as a masked tensor"):
        AutoSparse().encode(dataclasses.replace(message, scores={"conv.bias": torch.ones(4)}), _link(message))
    with pytest.raises(ValueError, match="must be torch.float32 of shape"):
        AutoSparse().encode(dataclasses.replace(message, scores={"fc.weight": torch.ones(6, 5)}), _link(message))
    # A payload whose scores name a tensor the payload does not mask is refused before allocating it.
    unmasked = dataclasses.replace(message, masks={"conv.weight": message.masks["conv.weight"]},
                                   scores={"conv.weight": torch.where(message.masks["conv.weight"], 1.0, 0.0)})
    payload = AutoSparse().encode(unmasked, _link(message))
    renamed = payload.replace(b"SCOR\x01\x00\x00\x00\x0b\x00conv.weight", b"SCOR\x01\x00\x00\x00\x0b\x00conv.bias\x00\x00")
    with pytest.raises(PayloadError, match="conv.bias"):
        AutoSparse().decode(renamed, _link(message))
    with pytest.raises(PayloadError, match="trailing bytes"):
        AutoSparse().decode(AutoSparse().encode(dataclasses.replace(message, scores={}), _link(message)) + b"XYZW0000",
                            _link(message))
    with pytest.raises(PayloadError, match="claims 9 records"):
        AutoSparse().decode(payload[:payload.index(b"SCOR")] + b"SCOR\x09\x00\x00\x00", _link(message))


def test_the_server_reads_the_mean_score_with_missing_entries_as_zero():
    uploads = [ClientResult(0, {}, {}, 10, 0.0, {"w": torch.tensor([2.0, 0.0, 4.0])}),
               ClientResult(1, {}, {}, 10, 0.0, {"w": torch.tensor([0.0, 0.0, 2.0])}),
               ClientResult(2, {}, {}, 10, 0.0)]
    assert _mean_scores(uploads)["w"].tolist() == pytest.approx([2 / 3, 0.0, 2.0])


def _ctx(readjust: bool = True) -> RoundContext:
    return RoundContext(Phase(1, 0, 0.5, 0.0, readjust, False, False, 0.5), generator(0, "mask", 1))


def test_equal_votes_go_to_the_higher_uploaded_gradient_then_the_lower_index():
    weights = {"w": torch.tensor([0.9, 0.0, 0.0, 0.0, 0.0])}
    masks = [[True, True, False, True, False], [True, False, True, False, True]]
    scores = [[0.0, 0.1, 0.0, 0.5, 0.0], [0.0, 0.0, 0.1, 0.0, 0.3]]
    uploads = [ClientResult(c, weights, {"w": torch.tensor(m)}, 10, 0.0, {"w": torch.tensor(s)})
               for c, (m, s) in enumerate(zip(masks, scores))]
    union = {"w": torch.ones(5, dtype=torch.bool)}
    ctx = dataclasses.replace(_ctx(), votes=lambda: _votes(uploads), scores=lambda: _mean_scores(uploads))

    def keeping(count: int, tie_break: str) -> list[bool]:
        policy = ClientReadjust(tie_break=tie_break)
        policy.shapes, policy.counts = {"w": (5,)}, lambda sparsity: {"w": count}
        return policy.server_step(ctx, weights, union, {})[1]["w"].tolist()

    assert keeping(3, "votes") == [True, True, True, False, False]  # one vote each: the lower index
    assert keeping(3, "votes_then_grad") == [True, False, False, True, True]  # mean |grad| 0.25, 0.15 win
    assert keeping(4, "votes_then_grad") == [True, True, False, True, True]  # 0.05 = 0.05: the lower index


def test_clients_score_only_the_weights_they_grew_and_only_when_readjusting():
    policy = ClientReadjust(tie_break="votes_then_grad")
    received = {"w": torch.tensor([True, True, False, False]), "v": torch.tensor([True, False])}
    mask = {"w": torch.tensor([True, False, True, False]), "v": torch.tensor([True, False])}
    weights = {"w": torch.zeros(4), "v": torch.zeros(2)}
    grads = {"w": torch.tensor([-1.0, 2.0, -3.0, 4.0]), "v": torch.tensor([5.0, 6.0])}
    scores = policy.client_scores(_ctx(), received, weights, mask, {}, lambda: grads)
    assert scores.keys() == {"w"} and scores["w"].tolist() == [0.0, 0.0, 3.0, 0.0]
    assert policy.client_scores(_ctx(readjust=False), received, weights, mask, {}, lambda: grads) == {}
    assert ClientReadjust(tie_break="votes").client_scores(_ctx(), received, weights, mask, {}, lambda: grads) == {}


def test_a_run_with_the_gradient_tie_break_pays_its_scores_only_in_readjustment_rounds():
    bindings = ("ClientReadjust.ratio = 0.5", "Readjusting.readjust_every = 1")  # readjusts in round 1 of 4
    by_votes = simulation("feddst_votes", *bindings, rounds=4)
    by_grad = simulation("feddst_votes", *bindings, "ClientReadjust.tie_break = 'votes_then_grad'", rounds=4)
    readjusted = 0
    for (_, _, votes), (_, state, grad) in zip(play(by_votes), play(by_grad)):
        readjusting = by_grad.experiment.schedule.phase(state.round).readjust
        readjusted += readjusting
        assert (grad["uplink_bytes"] > votes["uplink_bytes"]) == readjusting, state.round
        for name, mask in state.mask.items():
            assert bool((state.weights[name][~mask] == 0).all())
    assert readjusted
