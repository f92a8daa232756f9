"""Properties of the FLOP and byte accounting (fl_sparse.training.accounting, and the engine's cumulative counters)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers import play, simulation
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torch import nn

from fl_sparse.training.accounting import forward_macs, training_flops

pytestmark = pytest.mark.property

small_shape = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5)


@st.composite
def layers(draw, max_layers: int = 4):
    """(macs per layer, mask for some of the layers): as forward_macs and a mask policy would give them."""
    macs, mask = {}, {}
    for i in range(draw(st.integers(1, max_layers))):
        name = f"layer{i}.weight"
        macs[name] = draw(st.integers(0, 10**7))
        if draw(st.booleans()):
            mask[name] = torch.from_numpy(draw(hnp.arrays(np.bool_, draw(small_shape))))
    return macs, mask


def subset(draw, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t & torch.from_numpy(draw(hnp.arrays(np.bool_, t.shape))) for name, t in tensors.items()}


@given(case=layers(), data=st.data(), passes=st.integers(0, 10**4))
def test_flops_never_decrease_with_density(case, data, passes):
    macs, mask = case
    sparser = subset(data.draw, mask)
    sparsest = subset(data.draw, sparser)
    flops = [training_flops(macs, m, {}, passes) for m in (mask, sparser, sparsest)]
    assert flops[0] >= flops[1] >= flops[2] >= 0
    dense = training_flops(macs, {}, {}, passes)
    assert dense >= flops[0]
    assert dense == pytest.approx(6 * sum(macs.values()) * passes)  # 3 phases x 2 FLOPs per MAC
    changed = [name for name in mask if int(sparsest[name].sum()) < int(mask[name].sum()) and macs[name] > 0]
    if changed and passes:
        assert flops[2] < flops[0], "dropping weights of a layer with MACs must save FLOPs"


@given(case=layers(), data=st.data(), passes=st.integers(0, 10**4), epochs=st.integers(1, 20))
def test_flops_are_linear_in_sample_passes(case, data, passes, epochs):
    macs, mask = case
    frozen = subset(data.draw, mask)
    one = training_flops(macs, mask, frozen, passes)
    assert training_flops(macs, mask, frozen, passes * epochs) == pytest.approx(epochs * one, rel=1e-12)
    assert training_flops(macs, mask, frozen, passes + 7) == pytest.approx(one + training_flops(macs, mask, frozen, 7),
                                                                            rel=1e-12)
    assert training_flops(macs, mask, frozen, 0) == 0


@given(case=layers(), data=st.data(), passes=st.integers(1, 10**4))
def test_frozen_weights_reduce_flops_by_at_most_their_weight_gradient(case, data, passes):
    """Freezing skips only the weight-gradient phase: more frozen -> fewer FLOPs, and freezing everything that
    is active leaves the forward and input-gradient phases, i.e. 2/3 of the masked layers' cost."""
    macs, mask = case
    frozen = subset(data.draw, mask)
    more_frozen = {name: f | (mask[name] & torch.from_numpy(data.draw(hnp.arrays(np.bool_, f.shape))))
                   for name, f in frozen.items()}
    free, some, more = (training_flops(macs, mask, f, passes) for f in ({}, frozen, more_frozen))
    assert free >= some >= more
    if any(int(f.sum()) and macs[name] for name, f in frozen.items()):
        assert some < free
    all_frozen = training_flops(macs, mask, mask, passes)
    unmasked = training_flops({n: v for n, v in macs.items() if n not in mask}, {}, {}, passes)
    assert all_frozen - unmasked == pytest.approx((free - unmasked) * 2 / 3, rel=1e-9, abs=1e-6)


@given(channels=st.integers(1, 4), out_channels=st.integers(1, 4),
       kernel=st.integers(1, 3), side=st.integers(3, 8), hidden=st.integers(1, 6), classes=st.integers(1, 5))
def test_forward_macs_are_output_elements_times_fan_in(channels, out_channels, kernel, side, hidden, classes):
    model = nn.Sequential(nn.Conv2d(channels, out_channels, kernel), nn.ReLU(), nn.Flatten(),
                          nn.Linear(out_channels * (side - kernel + 1) ** 2, hidden), nn.Linear(hidden, classes))
    macs = forward_macs(model, (channels, side, side))
    out_side = side - kernel + 1
    assert macs == {"0.weight": out_channels * out_side ** 2 * channels * kernel ** 2,
                    "3.weight": out_channels * out_side ** 2 * hidden, "4.weight": hidden * classes}
    assert model.training  # restored


def test_cumulative_gb_is_the_sum_of_the_bytes_actually_encoded():
    """A 4-round PFFDST run that freezes after round 2 (so FreezeAware sends frozen parts): every payload the
    codecs return is counted, once, and cumulative_gb is their running sum / 1e9. 200 clients keep it fast."""
    sim = simulation("pffdst", "TwoStage.readjust_every = 1", "Experiment.num_clients = 200", rounds=4)
    measured = {"down": [], "up": []}
    for direction, codec in (("down", sim.experiment.downlink_codec), ("up", sim.experiment.uplink_codec)):
        original = codec.encode

        def counting(message, link, original=original, direction=direction):
            payload = original(message, link)
            measured[link.direction].append(len(payload))
            return payload

        codec.encode = counting
    total_bytes, total_flops, previous = 0, 0.0, {"down": 0, "up": 0}
    froze = False
    clients = sim.experiment.clients_per_round
    for before, state, metrics in play(sim):
        round_bytes = {d: sum(measured[d][previous[d]:]) for d in measured}
        encoded_down = len(measured["down"]) - previous["down"]
        if before.freeze_version == 0:  # FreezeAware is its inner codec: one broadcast, counted per client
            assert encoded_down == 1
            round_bytes["down"] *= clients
        else:  # each client may owe the frozen part: one payload per client
            assert encoded_down == clients
        previous = {d: len(measured[d]) for d in measured}
        assert metrics["downlink_bytes"] == round_bytes["down"] and metrics["uplink_bytes"] == round_bytes["up"]
        total_bytes += round_bytes["down"] + round_bytes["up"]
        total_flops += metrics["flops"]
        assert state.cumulative_bytes == total_bytes
        assert metrics["cumulative_gb"] == pytest.approx(total_bytes / 1e9, rel=1e-12)
        assert metrics["cumulative_flops"] == pytest.approx(total_flops, rel=1e-12)
        assert metrics["flops"] > 0
        froze = froze or state.freeze_version > 0
    assert froze, "the run should have frozen weights, so that FreezeAware framing is counted too"
    assert math.isclose(total_bytes / 1e9, state.cumulative_bytes / 1e9)
