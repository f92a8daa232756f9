"""SparsyFed as its authors run it (issue 30): the first layer under the global threshold, no server re-prune,
their initialisation, and the regrowth / dropped-weights metric every sparse run logs."""

from __future__ import annotations

import math

import torch
from helpers import play, simulation

from fl_sparse.core.interfaces import Link, Message, Phase, RoundContext
from fl_sparse.core.rng import generator
from fl_sparse.engine.server import _turnover_metrics
from fl_sparse.models import LeNet
from fl_sparse.models.powerprop import Powerprop, effective_weight
from fl_sparse.parts.codecs import AutoSparse
from fl_sparse.parts.mask_policies import ClientTopK
from fl_sparse.parts.schedules import Constant


def _ctx(sparsity: float) -> RoundContext:
    return RoundContext(Phase(1, 0, sparsity, 0.0, False, False, False, 1.0), generator(0, "mask", 1))


def test_the_first_layer_is_pruned_under_the_same_threshold_as_the_rest():
    model = LeNet(10)
    weights = {name: t.detach() for name, t in model.state_dict().items()}
    for dense_first in (False, True):
        policy = ClientTopK(dense_first_layer=dense_first)
        policy.setup(model, Constant(0.9))
        mask = policy.initial_mask(weights, None)
        _, kept = policy.client_step(_ctx(0.9), weights, mask, {}, lambda: {})
        if dense_first:
            assert bool(kept["conv1.weight"].all())
            continue
        assert not bool(kept["conv1.weight"].all())
        total = sum(m.numel() for m in kept.values())
        assert sum(int(m.sum()) for m in kept.values()) == round(0.1 * total)
        smallest_kept = min(float(weights[n][m].abs().min()) for n, m in kept.items() if m.any())
        largest_dropped = max(float(weights[n][~m].abs().max()) for n, m in kept.items() if (~m).any())
        assert smallest_kept >= largest_dropped  # one threshold over every layer, conv1 included


class _Recording:
    """An executor that trains as the experiment's own and keeps the client results of every round."""

    def __init__(self, inner):
        self.inner, self.rounds = inner, []

    def train(self, job, tasks, ctx):
        results = self.inner.train(job, tasks, ctx)
        self.rounds.append(results)
        return results


def test_without_the_server_prune_the_global_support_is_the_union_and_the_downlink_carries_it():
    sim = simulation("sparsyfed", "SPARSITY = 0.9", rounds=2)
    recorder = _Recording(sim.experiment.executor)
    sim.experiment.executor = recorder
    (_, first, _), (_, second, metrics) = list(play(sim))
    for name, mask in first.mask.items():
        union = torch.zeros_like(mask)
        for result in recorder.rounds[0]:
            union |= result.mask[name]
        assert torch.equal(mask, union), name
    density = sum(int(m.sum()) for m in first.mask.values()) / sum(m.numel() for m in first.mask.values())
    assert density > 0.1  # above the 0.1 target: nothing cut the union back
    # Every client of round 2 receives the union, and the measured downlink is its encoding.
    one = len(AutoSparse().encode(Message(first.weights, first.mask), Link("down", 0, {}, {}, 0)))
    assert metrics["downlink_bytes"] == one * sim.experiment.clients_per_round
    exact = simulation("sparsyfed_exact_density", "SPARSITY = 0.9", rounds=1)
    ((_, pruned, _),) = list(play(exact))  # the earlier variant cuts the union back to the target
    assert sum(int(m.sum()) for m in pruned.mask.values()) < sum(int(m.sum()) for m in first.mask.values())


def test_the_regrowth_metric_counts_weights_that_enter_and_leave_the_global_support():
    before = {"a": torch.tensor([0.0, 1.0, 2.0, 0.0]), "b": torch.tensor([[3.0, 0.0]])}
    after = {"a": torch.tensor([5.0, 0.0, 2.0, 0.0]), "b": torch.tensor([[0.0, 4.0]])}
    mask = {"a": torch.ones(4, dtype=torch.bool), "b": torch.ones(1, 2, dtype=torch.bool)}
    assert _turnover_metrics(before, after, mask) == {"weights_regrown": 2.0, "weights_dropped": 2.0}
    assert _turnover_metrics(before, after, {}) == {}  # dense runs have no support to track
    sim = simulation("feddst", rounds=2)
    for _, _, metrics in play(sim):
        assert metrics["weights_regrown"] >= 0 and metrics["weights_dropped"] >= 0


def test_the_authors_initialisation_is_a_truncated_normal_of_std_one_over_root_fan_in():
    torch.manual_seed(0)
    model = Powerprop(beta=1.25, init="truncated_normal")(LeNet(10))
    fc1 = effective_weight(model.fc1.weight.detach(), 1.25)
    bound = 2.0 / math.sqrt(6400)
    assert float(fc1.abs().max()) <= bound * (1 + 1e-5)
    assert abs(float(fc1.std()) - 0.88 / math.sqrt(6400)) < 0.02 / math.sqrt(6400)  # std of N(0,1) cut at 2
    torch.manual_seed(0)
    default = effective_weight(Powerprop(beta=1.25)(LeNet(10)).fc1.weight.detach(), 1.25)
    assert float(default.std()) < 0.7 * float(fc1.std())  # PyTorch's default is 1/sqrt(3 fan_in)


def test_the_learning_rate_schedule_is_a_part_every_optimiser_round_follows():
    from fl_sparse.config.compose import compose
    from fl_sparse.parts.objectives import SGD, ExponentialDecay

    decay = ExponentialDecay(0.5, 0.01, 700)
    assert decay.rate(1) == 0.5 and math.isclose(decay.rate(700), 0.01) and decay.rate(900) == decay.rate(700)
    assert math.isclose(decay.rate(350) / decay.rate(349), decay.rate(2) / decay.rate(1))  # a constant factor
    sgd = SGD(lr=0.5, momentum=0.0, lr_schedule=decay)
    assert sgd.at_round(700).lr == decay.rate(700) and SGD().at_round(5) is not None
    experiment = compose("sparsyfed", ["sparsyfed_cifar10_resnet18"], ["DATA_DIR = '/unused'"]).experiment
    assert (experiment.rounds, experiment.num_clients, experiment.clients_per_round) == (700, 100, 10)
    assert experiment.optimizer.at_round(1).lr == 0.5 and math.isclose(experiment.optimizer.at_round(700).lr, 0.01)
    # A scheduled run trains with the round's rate: a lower rate moves the weights less.
    fast = simulation("fedavg", "SGD.lr_schedule = @ExponentialDecay()", "ExponentialDecay.start = 0.05",
                      "ExponentialDecay.end = 0.05", "ExponentialDecay.rounds = 2", rounds=1)
    slow = simulation("fedavg", "SGD.lr_schedule = @ExponentialDecay()", "ExponentialDecay.start = 0.0001",
                      "ExponentialDecay.end = 0.0001", "ExponentialDecay.rounds = 2", rounds=1)
    moved = []
    for sim in (fast, slow):
        ((before, after, _),) = list(play(sim))
        moved.append(sum(float((after.weights[n] - before.weights[n]).abs().sum()) for n in before.weights))
    assert moved[0] > 10 * moved[1]


def test_with_the_first_batch_threshold_a_conv_layers_later_batches_are_cut_at_it():
    from fl_sparse.models.powerprop import PowerpropConv2d, keep_largest, magnitude_threshold

    torch.manual_seed(0)
    reparameterization = Powerprop(conv_threshold="first_batch")
    model = reparameterization(LeNet(10)).train()
    conv = model.conv2
    assert isinstance(conv, PowerpropConv2d) and conv.threshold_from_first_batch
    with torch.no_grad():  # a sparse layer: activation pruning keeps the fraction of its weight density
        conv.weight[:, :3] = 0
    first, later = torch.randn(4, 6, 28, 28), 3 * torch.randn(4, 6, 28, 28)
    density = float((conv.weight != 0).float().mean())
    conv(first.requires_grad_())
    fixed = conv.first_threshold
    assert torch.equal(fixed, magnitude_threshold(first, density))
    conv(later.requires_grad_())
    assert torch.equal(conv.first_threshold, fixed)  # kept for the later batch
    # The later batch is cut at the first batch's threshold, not at its own (3x larger inputs keep more).
    assert int((keep_largest(later, density, fixed) != 0).sum()) > int((keep_largest(later, density) != 0).sum())
    reparameterization.start_local_training(model)
    assert conv.first_threshold is None  # the next client's round starts afresh
    per_batch = Powerprop()(LeNet(10)).train()
    with torch.no_grad():
        per_batch.conv2.weight[:, :3] = 0
    per_batch.conv2(first.requires_grad_())
    assert per_batch.conv2.first_threshold is None


def test_the_density_and_freezing_invariants_hold_in_every_mode():
    model = LeNet(10)
    weights = {name: t.detach().clone() for name, t in model.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    frozen = {name: torch.rand(w.shape, generator=g) < 0.01 for name, w in weights.items() if name.endswith("weight")}
    for dense_first in (False, True):
        for server_prune in (False, True):
            policy = ClientTopK(dense_first_layer=dense_first, server_prune=server_prune)
            policy.setup(model, Constant(0.9))
            mask = policy.initial_mask(weights, None)
            new_weights, kept = policy.client_step(_ctx(0.9), weights, mask, frozen, lambda: {})
            assert sum(int(kept[n].sum()) for n in policy.pruned_names) == policy.count(0.9)
            for name, held in kept.items():
                assert bool(held[frozen[name]].all()), name  # frozen weights are always kept
                assert bool((new_weights[name][~held] == 0).all()), name
            union = {name: held | torch.roll(held, 1) for name, held in kept.items()}
            _, served = policy.server_step(_ctx(0.9), new_weights, union, frozen)
            count = sum(int(served[n].sum()) for n in policy.pruned_names)
            assert count == policy.count(0.9) if server_prune else count > policy.count(0.9)
