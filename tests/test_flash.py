"""FLASH (flash_spdst.gin): the discovery phase before round 1 (MaskDiscovery, FlashDensities), its client step
(SparseMomentumStep) and the fixed consensus mask of SPDST."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import play, simulation

from fl_sparse.core.interfaces import Link, Message, ModelSchema, Phase, RoundContext
from fl_sparse.core.rng import generator
from fl_sparse.parts.codecs import DenseF32
from fl_sparse.parts.flash import FlashDensities, SparseMomentumStep
from fl_sparse.sparse.budgets import split_capped
from fl_sparse.sparse.mask_ops import active_counts

FAST = ("FlashDensities.epochs = 3", "FlashDensities.fraction = 0.3")


def test_split_capped_is_proportional_exact_and_respects_caps():
    assert split_capped(10, {"a": 1.0, "b": 1.0}, {"a": 100, "b": 100}) == {"a": 5, "b": 5}
    assert split_capped(10, {"a": 3.0, "b": 1.0}, {"a": 4, "b": 100}) == {"a": 4, "b": 6}  # a's excess goes to b
    assert split_capped(7, {"a": 1.0, "b": 1.0, "c": 1.0}, {"a": 9, "b": 9, "c": 9}) == {"a": 3, "b": 2, "c": 2}
    assert split_capped(50, {"a": 1.0, "b": 1.0}, {"a": 3, "b": 4}) == {"a": 3, "b": 4}  # no more than fits


def test_the_sparse_momentum_step_prunes_the_smallest_and_regrows_as_many_at_zero():
    g = torch.Generator().manual_seed(0)
    weights = {"a": torch.randn(20, 10, generator=g), "b": torch.randn(30, generator=g) * 5}
    mask = {"a": torch.rand(20, 10, generator=g) < 0.3, "b": torch.rand(30, generator=g) < 0.3}
    weights = {name: torch.where(mask[name], w, torch.zeros(())) for name, w in weights.items()}
    ctx = RoundContext(Phase(0, 0, 0.7, 0.0, True, False, False, 0.0), generator(0, "discovery", 1))
    new_weights, new_mask = SparseMomentumStep(0.2).client_step(ctx, weights, mask, {}, lambda: {})
    before, after = active_counts(mask), active_counts(new_mask)
    assert sum(after.values()) == sum(before.values())  # as many regrown as pruned
    for name in mask:
        removed = mask[name] & ~new_mask[name]
        assert int(removed.sum()) <= math.ceil(0.2 * before[name])
        kept = mask[name] & new_mask[name]
        if removed.any() and kept.any():  # only the smallest magnitudes were pruned
            assert weights[name][removed].abs().max() <= weights[name][kept].abs().min()
        grown = new_mask[name] & ~mask[name]
        assert bool((new_weights[name][grown] == 0).all())
    # layer b has the larger mean |w|, so it gets the larger share of the regrowth
    assert after["b"] - (before["b"] - math.ceil(0.2 * before["b"])) > after["a"] - (before["a"] - math.ceil(0.2 * before["a"]))


def test_discovery_uploads_one_float_per_layer_per_client_and_its_bytes_count():
    sim = simulation("flash_spdst", *FAST, rounds=2)
    initial = {name: t.clone() for name, t in sim.model.state_dict().items()}
    state = sim.initial_state()
    layers = len(state.mask)
    chosen = max(1, int(0.3 * sim.data.num_clients))
    report = {"layer_density": torch.zeros(layers)}
    link = Link("up", 0, {}, {}, 0, {}, ModelSchema.of(report))
    upload_bytes = len(DenseF32().encode(Message(report, {}), link))
    assert upload_bytes < 64 + 4 * layers  # one float32 per layer, a header and one record
    downlink = len(sim.experiment.downlink_codec.encode(Message(initial, {}), Link("down", 0, {}, {}, 0, {})))
    metrics = sim.discovery_metrics
    # every epoch sends the client's model down once (3 epochs x chosen clients), then one upload each
    assert metrics["discovery_bytes"] > chosen * upload_bytes
    assert state.cumulative_bytes == metrics["discovery_bytes"] and state.cumulative_flops == metrics["discovery_flops"]
    assert metrics["discovery_bytes"] < 3 * chosen * downlink + chosen * upload_bytes
    assert metrics["discovery_flops"] > 0
    # the model is re-initialised: round 1 starts from fresh weights, not the ones the clients trained
    assert not torch.equal(state.weights["fc1.weight"][state.mask["fc1.weight"]],
                           initial["fc1.weight"][state.mask["fc1.weight"]])


def test_the_consensus_mask_holds_the_target_density_and_is_fixed_for_every_round():
    sim = simulation("flash_spdst", *FAST, rounds=3)
    total = sum(m.numel() for m in sim.initial_state().mask.values())
    density = 1 - sim.experiment.schedule.initial_sparsity()
    first = None
    for round, (before, state, metrics) in enumerate(play(sim), 1):
        if first is None:
            first = before.mask
            assert abs(sum(active_counts(first).values()) - density * total) <= len(first)  # d, up to clipping
            assert metrics["discovery_bytes"] > 0 and metrics["cumulative_gb"] * 1e9 >= metrics["discovery_bytes"]
        else:
            assert "discovery_bytes" not in metrics
        assert all(torch.equal(state.mask[name], first[name]) for name in first), round  # SPDST: never changes
        for name, mask in state.mask.items():
            assert bool((state.weights[name][~mask] == 0).all())


def test_the_consensus_scales_the_clients_mean_densities_and_caps_full_layers():
    shapes = {"small": (10,), "big": (990,)}
    counts = FlashDensities.consensus_counts({"small": 0.9, "big": 0.05}, shapes, density=0.1)
    assert counts["small"] == 10  # 0.9 scaled up is above 1: the layer is full, its excess not redistributed
    assert counts["big"] == round(0.05 * (1000 * 0.1 / (0.9 * 10 + 0.05 * 990)) * 990)
    same = FlashDensities.consensus_counts({"small": 0.1, "big": 0.1}, shapes, density=0.2)
    assert same == {"small": 2, "big": 198}


@pytest.mark.parametrize("bad", ["FlashDensities.fraction = 0", "FlashDensities.epochs = 0",
                                 "FlashDensities.prune_rate = 1.0"])
def test_bad_discovery_settings_fail_in_one_line(bad):
    from fl_sparse.config.compose import compose
    from fl_sparse.core.errors import ConfigError

    with pytest.raises(ConfigError, match="FlashDensities"):
        compose("flash_spdst", ["demo"], [bad])


def test_jointdst_clients_move_their_mask_and_the_server_keeps_the_consensus_count():
    sim = simulation("flash_jointdst", *FAST, rounds=3)
    state = sim.initial_state()
    total = sum(m.numel() for m in state.mask.values())
    target = round((1 - sim.experiment.schedule.phase(1).sparsity) * total)
    ctx, clients = sim.open_round(state)
    tasks, _ = sim._send_down(state, clients)
    [result] = sim.experiment.executor.train(sim.job, tasks[:1], ctx)
    assert sum(active_counts(result.mask).values()) == sum(active_counts(state.mask).values())  # as many regrown
    assert any(not torch.equal(result.mask[n], state.mask[n]) for n in state.mask)  # ... elsewhere
    for _, after, _ in play(sim):
        assert abs(sum(active_counts(after.mask).values()) - target) <= len(after.mask)  # d, up to clipping
        for name, mask in after.mask.items():
            assert bool((after.weights[name][~mask] == 0).all())


def test_flash_with_freezing_keeps_the_frozen_weights_and_grows_to_the_second_stage():
    sim = simulation("flash_pf", *FAST, rounds=4)
    schedule = sim.experiment.schedule
    total = sum(m.numel() for m in sim.initial_state().mask.values())
    frozen_values, stage1_mask = None, None
    for _, state, _ in play(sim):
        density = sum(active_counts(state.mask).values()) / total
        if state.round == 1:
            stage1_mask = state.mask
        if state.round == 2:  # stage 1 ends: freeze every non-zero weight, then the budgets of stage 2
            # up to the second stage's density: a layer the consensus fills is capped, its excess not spread
            assert state.frozen and 1 - schedule.phase(1).sparsity < density <= 1 - schedule.phase(3).sparsity
            # What is frozen is the stage's model, under the mask its last round was sent, not the union of
            # what the clients proposed in that round; so stage 2 has weights left to train.
            assert all(bool((f <= stage1_mask[n]).all()) for n, f in state.frozen.items())
            assert sum(active_counts(state.frozen).values()) < sum(active_counts(state.mask).values())
            frozen_values = {n: state.weights[n][f].clone() for n, f in state.frozen.items()}
        if state.round > 2:
            for name, frozen in state.frozen.items():
                assert bool((frozen <= state.mask[name]).all())
                assert torch.equal(state.weights[name][frozen], frozen_values[name])
        for name, mask in state.mask.items():
            assert bool((state.weights[name][~mask] == 0).all())
    assert frozen_values is not None


def test_flower_refuses_a_discovery_phase_in_one_line():
    from fl_sparse.config.compose import compose
    from fl_sparse.core.errors import ConfigError
    from fl_sparse.flower.setup import check_runs_on_flower

    with pytest.raises(ConfigError, match="mask_discovery .* run it with fl-sparse run"):
        check_runs_on_flower("flash_spdst", compose("flash_spdst", ["demo"], []).experiment)
    check_runs_on_flower("feddst", compose("feddst", ["demo"], []).experiment)
