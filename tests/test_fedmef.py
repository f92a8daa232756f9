"""FedMef (fedmef.gin): ScoredReadjust (the server readjusts from uploaded top-k gradients) and Extrusion (the
budget-aware extrusion term on the weights about to be pruned)."""

from __future__ import annotations

import dataclasses
import math

import torch
from helpers import play, simulation

from fl_sparse.core.interfaces import ClientResult, Phase, RoundContext
from fl_sparse.core.rng import generator
from fl_sparse.engine.server import _mean_scores
from fl_sparse.parts.mask_policies import ScoredReadjust
from fl_sparse.parts.objectives import Extrusion
from fl_sparse.sparse.mask_ops import active_counts


def _ctx(readjust: bool = True, progress: float = 0.0) -> RoundContext:
    return RoundContext(Phase(1, 0, 0.5, 0.0, readjust, False, False, progress), generator(0, "mask", 1))


def _policy(alpha: float = 0.5) -> ScoredReadjust:
    policy = ScoredReadjust(alpha=alpha)
    policy.shapes = {"w": (8,)}
    return policy


WEIGHTS = {"w": torch.tensor([0.9, -0.1, 0.5, 0.0, -0.05, 0.0, 0.0, 0.0])}
MASK = {"w": torch.tensor([True, True, True, True, True, False, False, False])}


def test_the_planned_prune_is_the_k_smallest_active_weights_and_what_the_server_prunes():
    policy = _policy()  # alpha_0 = 0.5: k = round(0.5 * 5) = 2
    low = policy.planned_prune(_ctx(), WEIGHTS, MASK, {})
    assert low["w"].tolist() == [False, False, False, True, True, False, False, False]  # |0.0| and |-0.05|
    assert bool((low["w"] <= MASK["w"]).all())
    assert policy.planned_prune(_ctx(readjust=False), WEIGHTS, MASK, {}) == {}
    frozen = {"w": torch.tensor([False, False, False, True, False, False, False, False])}
    assert policy.planned_prune(_ctx(), WEIGHTS, MASK, frozen)["w"].tolist() == \
        [False, True, False, False, True, False, False, False]  # frozen weights are never pruned
    ctx = dataclasses.replace(_ctx(), scores=lambda: {})
    _, after = policy.server_step(ctx, WEIGHTS, MASK, {})
    assert not bool((after["w"] & low["w"]).any())  # unmoved weights: the server prunes exactly theta_low


def test_clients_upload_their_top_k_gradients_outside_their_mask():
    grads = {"w": torch.tensor([9.0, 9.0, 9.0, 9.0, 9.0, -3.0, 1.0, 2.0])}
    scores = _policy().client_scores(_ctx(), MASK, WEIGHTS, MASK, {}, lambda: grads)
    assert scores["w"].tolist() == [0, 0, 0, 0, 0, 3.0, 0, 2.0]  # k = 2, never an active position
    assert _policy().client_scores(_ctx(readjust=False), MASK, WEIGHTS, MASK, {}, lambda: grads) == {}


def test_the_server_replaces_k_weights_per_layer_by_the_best_mean_scores_at_zero():
    uploads = [ClientResult(0, {}, {}, 1, 0.0, {"w": torch.tensor([0, 0, 0, 0, 0, 3.0, 0, 2.0])}),
               ClientResult(1, {}, {}, 1, 0.0, {"w": torch.tensor([0, 0, 0, 0, 0, 0, 5.0, 0.5])})]
    ctx = dataclasses.replace(_ctx(), scores=lambda: _mean_scores(uploads))
    weights, mask = _policy().server_step(ctx, WEIGHTS, MASK, {})
    assert active_counts(mask) == active_counts(MASK)
    assert mask["w"].tolist() == [True, True, True, False, False, True, True, False]  # means 1.5, 2.5 beat 1.25
    grown, pruned = mask["w"] & ~MASK["w"], MASK["w"] & ~mask["w"]
    assert int(grown.sum()) == int(pruned.sum()) == 2 and bool((weights["w"][grown] == 0).all())
    assert bool((weights["w"][~mask["w"]] == 0).all())


def test_the_extrusion_gradient_is_two_lambda_w_on_theta_low_and_zero_elsewhere():
    objective = Extrusion(strength=0.25)
    bound = objective.at_round(_ctx(), WEIGHTS, MASK, {}, _policy())
    assert bound is not objective
    assert objective.at_round(_ctx(readjust=False), WEIGHTS, MASK, {}, _policy()) is objective  # no term
    params = {"w": torch.tensor([0.7, -0.2, 0.4, 0.3, -0.6, 0.0, 0.0, 0.0], requires_grad=True)}
    logits, targets = torch.zeros(1, 3, requires_grad=True), torch.tensor([1])
    plain = torch.autograd.grad(objective.loss(logits, targets, params, params), params["w"], allow_unused=True,
                                materialize_grads=True)[0]
    extruded = torch.autograd.grad(bound.loss(logits, targets, params, params), params["w"])[0]
    low = torch.tensor([False, False, False, True, True, False, False, False])
    assert torch.equal((extruded - plain)[~low], torch.zeros(6))
    assert torch.allclose((extruded - plain)[low], 2 * 0.25 * params["w"].detach()[low])


def test_a_fedmef_run_keeps_layer_counts_and_pays_for_its_scores_in_adjustment_rounds():
    sim = simulation("fedmef", "Readjusting.readjust_every = 2", rounds=4)  # adjusts in round 2 of 4
    plain = simulation("random_mask", rounds=4)
    counts = active_counts(sim.initial_state().mask)
    for (_, state, metrics), (_, _, fixed) in zip(play(sim), play(plain)):
        assert active_counts(state.mask) == counts
        adjusting = sim.experiment.schedule.phase(state.round).readjust
        assert (metrics["uplink_bytes"] > fixed["uplink_bytes"]) == adjusting, state.round
        if adjusting:
            assert metrics["weights_regrown"] == 0  # grown at 0 ...
            assert metrics["weights_dropped"] > 0  # ... in place of pruned non-zero weights


def test_activation_pruning_keeps_the_stated_fraction_and_an_exact_forward():
    from fl_sparse.models import LeNet
    from fl_sparse.models.powerprop import ActivationPruning, keep_largest

    torch.manual_seed(0)
    dense = LeNet()
    pruned = ActivationPruning(keep=0.3)(LeNet())
    pruned.load_state_dict(dense.state_dict())
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(pruned(x), dense(x))  # the forward pass is exact
    layer, inputs = pruned.fc2, torch.randn(5, 120, requires_grad=True)
    out = layer(inputs)
    grad_w, grad_x = torch.autograd.grad(out.sum(), [layer.weight, inputs])
    kept = keep_largest(inputs.detach(), 0.3)
    assert int((kept != 0).sum()) == math.ceil(0.3 * inputs.numel())  # the saved input keeps 30 %
    assert torch.allclose(grad_w, torch.ones_like(out).T @ kept)  # only the weight gradient uses it
    assert torch.allclose(grad_x, torch.ones_like(out) @ layer.weight)  # the input gradient stays exact
