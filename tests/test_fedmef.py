"""FedMef (fedmef.gin): ScoredReadjust (the server readjusts from uploaded top-k gradients) and Extrusion (the
budget-aware extrusion term on the weights about to be pruned)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from helpers import play, simulation

from fl_sparse.core.interfaces import ClientResult, Phase, RoundContext
from fl_sparse.core.rng import generator
from fl_sparse.engine.server import _mean_scores
from fl_sparse.parts.mask_policies import ScoredReadjust
from fl_sparse.parts.objectives import Extrusion, _smallest
from fl_sparse.sparse.mask_ops import active_counts

pytestmark = pytest.mark.usefixtures("one_thread")


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


def test_the_research_codes_extrusion_penalises_half_the_planned_count_chosen_again_at_each_step():
    """norm='l2', fraction=0.5, per_step=True: strength * ||w_S||_2 over S, the smallest-|w| half of the planned
    count among the active weights of the current model; gradient strength * w / ||w_S|| on S, 0 elsewhere."""
    objective = Extrusion(strength=0.25, norm="l2", fraction=0.5, per_step=True)
    bound = objective.at_round(_ctx(), WEIGHTS, MASK, {}, _policy())
    logits, targets = torch.zeros(1, 3, requires_grad=True), torch.tensor([1])

    def extra_gradient(values):
        params = {"w": torch.tensor(values, requires_grad=True)}
        plain = torch.autograd.grad(objective.loss(logits, targets, params, params), params["w"], allow_unused=True,
                                    materialize_grads=True)[0]
        return torch.autograd.grad(bound.loss(logits, targets, params, params), params["w"])[0] - plain

    # Planned: 2 weights, so 1 per step; with these weights the smallest active one is index 3 ...
    first = extra_gradient([0.7, -0.2, 0.4, 0.1, -0.6, 0.5, 0.0, 0.0])
    assert first.nonzero().flatten().tolist() == [3] and torch.allclose(first[3], torch.tensor(0.25))  # w/|w|
    # ... and after a step that moves it, the set follows the weights (index 1 now), still among active ones.
    second = extra_gradient([0.7, -0.05, 0.4, 0.3, -0.6, 0.5, 0.0, 0.0])
    assert second.nonzero().flatten().tolist() == [1] and torch.allclose(second[1], torch.tensor(-0.25))


def test_a_per_step_extrusion_chooses_its_set_once_per_step(monkeypatch):
    """The budget-aware rate and the loss read theta_low at the same weights (the loss on detached leaves): the
    set is chosen once, and again after a step changes the weights in place."""
    from fl_sparse.parts import objectives

    calls = []
    monkeypatch.setattr(objectives, "_smallest", lambda *args: calls.append(1) or _smallest(*args))
    bound = Extrusion(strength=0.25, norm="l2", fraction=0.5, per_step=True).at_round(_ctx(), WEIGHTS, MASK, {},
                                                                                       _policy())
    params = {"w": torch.tensor([0.7, -0.2, 0.4, 0.1, -0.6, 0.5, 0.0, 0.0])}
    logits, targets = torch.zeros(1, 3), torch.tensor([1])
    penalty = bound.budget_penalty(params)
    leaves = {"w": params["w"].detach().requires_grad_()}
    bound.loss(logits, targets, leaves, leaves)
    assert len(calls) == 1 and math.isclose(penalty, 0.1, rel_tol=1e-6)
    params["w"][3] = 0.3  # an in-place step: the smallest active weight is now index 1
    assert math.isclose(bound.budget_penalty(params), 0.2, rel_tol=1e-6) and len(calls) == 2


def test_a_fedmef_run_keeps_layer_counts_and_pays_for_its_scores_in_adjustment_rounds():
    sim = simulation("fedmef", "Readjusting.readjust_every = 2", rounds=4)  # adjusts in no round: 2 !< 0.6 * 4
    plain = simulation("random_mask", rounds=4)
    counts = active_counts(sim.initial_state().mask)
    for (_, state, metrics), (_, _, fixed) in zip(play(sim), play(plain)):
        assert active_counts(state.mask) == counts
        adjusting = sim.experiment.schedule.phase(state.round).readjust
        assert (metrics["uplink_bytes"] > fixed["uplink_bytes"]) == adjusting, state.round
        if adjusting:
            assert metrics["weights_regrown"] == 0  # grown at 0 ...
            assert metrics["weights_dropped"] > 0  # ... in place of pruned non-zero weights


def test_an_adjustment_round_keeps_every_layer_count_even_a_nearly_dense_one():
    sim = simulation("fedmef", "Readjusting.readjust_every = 2", rounds=5)  # adjusts in round 2 (2 < 0.6 * 5)
    assert [r for r in range(1, 6) if sim.experiment.schedule.phase(r).readjust] == [2]
    counts = active_counts(sim.initial_state().mask)
    *_, (_, state, _) = play(sim, 2)
    assert active_counts(state.mask) == counts


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


def _normalized_lenet(*parts):
    from fl_sparse.models import LeNetBN
    from fl_sparse.models.normalized import NormalizedSparseConv, Reparameterizations

    torch.manual_seed(0)
    return Reparameterizations([NormalizedSparseConv(), *parts])(LeNetBN())


def test_the_normalised_conv_standardises_the_active_weights_per_channel_times_its_gain():
    model = _normalized_lenet()
    conv = model.conv2
    with torch.no_grad():
        conv.weight.mul_(torch.rand(conv.weight.shape, generator=torch.Generator().manual_seed(1)) < 0.3)
        conv.gain.copy_(torch.linspace(0.5, 2.0, conv.out_channels))
    mask = conv.weight != 0
    fan_in = conv.weight[0].numel()
    effective = conv.computed_weight().detach()
    assert torch.equal(effective[~mask], torch.zeros(int((~mask).sum())))  # exactly 0 outside the mask
    for c in range(conv.out_channels):
        active = effective[c][mask[c]] * fan_in ** 0.5 / conv.gain[c].detach()
        assert abs(float(active.mean())) < 1e-5 and abs(float(active.std()) - 1) < 1e-5, c  # std: unbiased, as theirs


def test_the_normalised_conv_passes_gradients_to_its_gain_and_to_grown_zero_weights_only_in_the_mask():
    model = _normalized_lenet()
    conv = model.conv1
    with torch.no_grad():
        conv.weight[:, 0] = 0  # input channel 0: pruned or grown at 0 (the optimiser's mask tells them apart)
    model(torch.randn(4, 3, 32, 32)).square().sum().backward()
    assert bool((conv.gain.grad != 0).all())
    assert bool((conv.weight.grad[:, 0] != 0).any())  # a weight grown at 0 can leave 0
    bare = conv.weight.detach()[:, 1:].reshape(conv.out_channels, -1)
    assert torch.equal(conv.computed_weight()[:, 0], torch.zeros_like(conv.weight[:, 0]))
    assert bool((bare != 0).all())


def test_the_normalised_model_has_no_batchnorm_and_states_its_size():
    model = _normalized_lenet()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert not any(name.startswith("bn") for name in model.state_dict())
    assert sum(p.numel() for p in model.parameters()) == 782_028  # 782,006 + 6 + 16 gains
    assert model.conv1.gain.shape == (6,) and model.conv2.gain.shape == (16,)
    from fl_sparse.models import maskable_names
    assert "conv1.weight" in maskable_names(model) and "conv1.gain" not in maskable_names(model)


def test_a_model_without_batchnorm_is_refused_in_one_line():
    from fl_sparse.core.errors import ConfigError
    from fl_sparse.models import LeNet
    from fl_sparse.models.normalized import NormalizedSparseConv

    with pytest.raises(ConfigError, match="LeNetBN"):
        NormalizedSparseConv()(LeNet())


def test_activation_pruning_applies_to_the_normalised_convs_unless_told_as_in_the_authors_code():
    import torch.nn.functional as F

    from fl_sparse.models.powerprop import ActivationPruning, keep_largest

    model = _normalized_lenet(ActivationPruning(keep=0.3))
    conv = model.conv2
    assert conv.prune_activations and conv.activation_density == 0.3
    x = torch.randn(2, 6, 14, 14, requires_grad=True)
    out = conv(x)
    assert torch.equal(out, F.conv2d(x, conv.computed_weight(), conv.bias))  # the forward pass is exact
    (grad_w,) = torch.autograd.grad(out.sum(), [conv.weight])
    reference = F.conv2d(keep_largest(x.detach(), 0.3), conv.computed_weight(), conv.bias).sum()
    assert torch.allclose(grad_w, torch.autograd.grad(reference, [conv.weight])[0], atol=1e-6)
    assert not _normalized_lenet(ActivationPruning(normalized_convs=False)).conv2.prune_activations


def test_the_budget_aware_rate_matches_the_research_code_on_a_hand_worked_case():
    from fl_sparse.parts.objectives import SGD, BudgetAwareRate

    schedule = BudgetAwareRate(start=0.1, end=0.01, rounds=10)
    assert schedule.rate(1) == 0.1 and math.isclose(schedule.rate(6), 0.1 * 0.1 ** 0.5)  # 0.0316
    assert math.isclose(schedule.step_rate(6, lambda: 0.5), 0.05)  # beta = 0.5 * 0.1 beats alpha
    assert math.isclose(schedule.step_rate(6, lambda: 0.2), 0.1 * 0.1 ** 0.5)  # beta 0.02 < alpha
    assert math.isclose(schedule.step_rate(6, lambda: 50.0), 1.0)  # P clipped at 10
    assert schedule.step_rate(6, lambda: None) is None and schedule.step_rate(6, lambda: 0.0) is None
    optimizer = SGD(lr_schedule=schedule)
    assert math.isclose(optimizer.at_step(6, lambda: 0.5).lr, 0.05) and SGD().at_step(6, lambda: 0.5) is None
    bound = Extrusion(strength=0.01).at_round(_ctx(), WEIGHTS, MASK, {}, _policy())  # theta_low: positions 3, 4
    params = {"w": torch.tensor([0.7, -0.2, 0.4, 0.3, -0.6, 0.0, 0.0, 0.0])}
    assert math.isclose(bound.budget_penalty(params), 0.45 ** 0.5, rel_tol=1e-6)  # ||(0.3, -0.6)||_2
    assert Extrusion().budget_penalty(params) is None


def test_local_steps_of_an_extrusion_round_take_the_budget_aware_rate():
    from fl_sparse.parts.objectives import BudgetAwareRate

    rates = []
    original = BudgetAwareRate.step_rate

    def spy(self, round, penalty):
        rates.append((round, original(self, round, penalty)))
        return rates[-1][1]

    BudgetAwareRate.step_rate = spy
    try:
        sim = simulation("fedmef_bn", "Readjusting.readjust_every = 2", "SGD.lr_schedule = @BudgetAwareRate()",
                         "BudgetAwareRate.start = 0.05", "BudgetAwareRate.end = 0.005", "BudgetAwareRate.rounds = 5",
                         rounds=5)  # adjusts in round 2 of 5
        *_, (_, state, _) = play(sim)
    finally:
        BudgetAwareRate.step_rate = original
    assert {r for r, rate in rates if rate is not None} == {2}  # the adjustment round, every step
    assert all(rate is None for r, rate in rates if r != 2)
    assert all(rate >= 0.05 * 0.1 ** (1 / 5) for r, rate in rates if r == 2)  # never below that round's alpha
    for name, m in state.mask.items():
        assert torch.all(state.weights[name][~m] == 0), name
