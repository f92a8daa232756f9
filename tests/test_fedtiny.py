"""FedTiny (fedtiny.gin): adaptive BatchNorm selection before round 1 (AdaptiveBNSelection) and progressive
pruning (ScoredReadjust with layers_per_step), on the BatchNorm LeNet."""

from __future__ import annotations

import pytest
import torch
from helpers import play, simulation

from fl_sparse.core.errors import ConfigError
from fl_sparse.core.rng import generator
from fl_sparse.engine.discovery import InProcessDiscovery
from fl_sparse.models import LeNetBN
from fl_sparse.parts.fedtiny import AdaptiveBNSelection
from fl_sparse.sparse.mask_ops import active_counts, apply_mask

FAST = ("AdaptiveBNSelection.candidates = 2", "AdaptiveBNSelection.fraction = 0.3",
        "AdaptiveBNSelection.passes = 2", "AdaptiveBNSelection.data_fraction = 0.5")


def _discovery(sim) -> tuple[InProcessDiscovery, dict, list[str]]:
    weights = {name: t.detach().clone() for name, t in sim.model.state_dict().items()}
    return InProcessDiscovery(sim, 0.8), weights, list(sim.experiment.mask_policy.shapes)


def test_a_candidate_keeps_each_layers_largest_weights_near_the_target_density():
    sim = simulation("fedtiny", *FAST)
    _, weights, names = _discovery(sim)
    selection = AdaptiveBNSelection(spread=0.5, tolerance=0.02)
    mask = selection.candidate(weights, names, 0.2, generator(0, "mask", 0))
    total = sum(m.numel() for m in mask.values())
    assert abs(sum(active_counts(mask).values()) / total - 0.2) <= 0.02 * 0.2
    for name, m in mask.items():
        if 0 < int(m.sum()) < m.numel():
            assert weights[name][~m].abs().max() <= weights[name][m].abs().min()
    assert set(mask) == set(names)  # biases and BatchNorm are never masked


def test_re_estimation_changes_only_running_statistics_and_the_average_is_sample_weighted():
    sim = simulation("fedtiny", *FAST)
    clients, weights, names = _discovery(sim)
    mask = AdaptiveBNSelection().candidate(weights, names, 0.2, generator(0, "mask", 0))
    model = apply_mask(weights, mask)
    buffers, _, count = clients.forward(1, model, mask, passes=2, data_fraction=0.5, update_statistics=True)
    assert count > 0 and set(buffers) == {n for n, _ in sim.model.named_buffers()}
    assert not torch.equal(buffers["bn1.running_mean"], torch.zeros(6))  # re-estimated from reset
    stat_names = [n for n in weights if n.endswith(("running_mean", "running_var"))]
    chosen = [1, 4]
    per_client = [clients.forward(c, model, mask, 2, 0.5, update_statistics=True) for c in chosen]
    averaged = AdaptiveBNSelection(passes=2, data_fraction=0.5)._averaged_statistics(clients, chosen, model, mask,
                                                                                      stat_names)
    total = sum(n for _, _, n in per_client)
    for name in stat_names:
        expected = sum(b[name].double() * n for b, _, n in per_client) / total
        assert torch.allclose(averaged[name].double(), expected, atol=1e-6), name


def test_the_chosen_candidate_has_the_lowest_weighted_loss_and_the_phase_is_counted():
    sim = simulation("fedtiny", *FAST)
    state = sim.initial_state()
    clients, weights, names = _discovery(simulation("fedtiny", *FAST))
    selection = AdaptiveBNSelection(candidates=2, fraction=0.3, passes=2, data_fraction=0.5)
    g = generator(0, "mask", 0)
    masks = [selection.candidate(weights, names, 0.2, g) for _ in range(2)]
    chosen = clients.sample(0.3)
    stat_names = [n for n in weights if n.endswith(("running_mean", "running_var"))]
    losses = []
    for mask in masks:
        stats = selection._averaged_statistics(clients, chosen, apply_mask(weights, mask), mask, stat_names)
        losses.append(selection._mean_loss(clients, chosen, {**apply_mask(weights, mask), **stats}, mask))
    best = masks[min(range(2), key=lambda i: (losses[i], i))]
    assert all(torch.equal(state.mask[name], best[name]) for name in best)
    assert sim.discovery_metrics["discovery_bytes"] == state.cumulative_bytes > 0
    assert sim.discovery_metrics["discovery_flops"] > 0


def test_progressive_pruning_moves_one_layer_at_a_time_and_keeps_its_count():
    sim = simulation("fedtiny", *FAST, "Readjusting.readjust_every = 1", "ScoredReadjust.alpha = 0.5", rounds=6)
    names = list(sim.experiment.mask_policy.shapes)
    adjusted = []
    for before, state, _ in play(sim):
        assert active_counts(state.mask) == active_counts(before.mask)
        changed = [n for n in names if not torch.equal(state.mask[n], before.mask[n])]
        assert len(changed) <= 1, changed
        for name in changed:
            grown = state.mask[name] & ~before.mask[name]
            assert int(grown.sum()) == int((before.mask[name] & ~state.mask[name]).sum())
            assert bool((state.weights[name][grown] == 0).all())
        adjusted.append(changed)
    assert adjusted[0] == ["fc3.weight"] and adjusted[1] == ["fc2.weight"]  # from the output towards the input


def test_a_model_without_batchnorm_is_refused_in_one_line():
    with pytest.raises(ConfigError, match="needs a model with BatchNorm.*LeNetBN"):
        simulation("fedtiny", "Experiment.model = @LeNet")
    assert isinstance(simulation("fedtiny", *FAST).model, LeNetBN)
