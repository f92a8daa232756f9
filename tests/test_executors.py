"""Vectorized computes what Sequential computes: same weights (up to float rounding), same masks, same sample
counts, for dense, proximal, client-readjusting and frozen-weight rounds, with clients of very different
sizes (so short last batches, padding and clients that sit out steps are all exercised).

Tolerance: weights agree to ``ATOL`` absolute. vmap sums in a different order than the per-client loop
(batched matmuls, grouped convolutions, per-sample loss weights instead of a mean), which moves weights by
~1e-7 after a round of LeNet training; 1e-5 leaves two orders of magnitude of room and still catches any
real difference (a skipped or extra step moves weights by ~1e-3)."""

import os

import pytest
import torch
import torch.nn.functional as F
from helpers import play, simulation

from fl_sparse.core.interfaces import LocalObjective, RoundContext
from fl_sparse.models import LeNet
from fl_sparse.models.resnet import ResNet18
from fl_sparse.parts.executors.sequential import Sequential
from fl_sparse.parts.executors.vectorized import Vectorized, needs_sequential
from fl_sparse.training.client import ClientTask, generator

ATOL = 1e-5
SIZES = (7, 33, 130)  # 1, 2 and 5 batches of 32 per epoch; short last batches everywhere

pytestmark = [pytest.mark.kernels,  # two executors' float results: rerun with the CPU kernels forced down too
              pytest.mark.usefixtures("one_thread")]


def tasks_for(sim, state, sizes=SIZES, round=None):
    """Clients holding disjoint slices of the training pool of the given sizes, as the engine would build them."""
    pool = torch.cat(sim.data.client_train)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    r = round or state.round + 1
    return [ClientTask(client, state.weights, state.mask, state.frozen, pool[start:start + size],
                       sim.experiment.seed, r) for client, (start, size) in enumerate(zip(starts, sizes))]


def context(sim, round):
    return RoundContext(sim.experiment.schedule.phase(round), generator(sim.experiment.seed, "mask", round))


def assert_same_results(expected, actual):
    assert [r.client_id for r in actual] == [r.client_id for r in expected]
    for want, got in zip(expected, actual):
        assert got.num_samples == want.num_samples
        assert list(got.weights) == list(want.weights)
        for name in want.weights:
            torch.testing.assert_close(got.weights[name], want.weights[name], rtol=0, atol=ATOL, msg=name)
        assert set(got.mask) == set(want.mask)
        for name in want.mask:
            assert torch.equal(got.mask[name], want.mask[name]), name
        assert got.train_loss == pytest.approx(want.train_loss, rel=1e-5)


def run_both(sim, tasks, round, vectorized=None):
    sequential = Sequential().train(sim.job, tasks, context(sim, round))
    vectorized = (vectorized or Vectorized()).train(sim.job, tasks, context(sim, round))
    return sequential, vectorized


@pytest.mark.parametrize("algorithm, bindings", [
    ("fedavg", ["Experiment.local_epochs = 2"]),
    ("fedprox", ["Proximal.mu = 0.5"]),
    ("feddst", ["Readjusting.readjust_every = 1"]),  # round 1 readjusts: client prune + regrow by |gradient|
    ("sparsyfed", ["Powerprop.prune_activations = False"]),  # Powerprop under vmap, client global top-k
])
def test_vectorized_matches_sequential(algorithm, bindings):
    sim = simulation(algorithm, *bindings, rounds=4)
    state = sim.initial_state()
    sequential, vectorized = run_both(sim, tasks_for(sim, state), 1)
    assert_same_results(sequential, vectorized)
    assert all(r.weights["fc1.weight"].ne(state.weights["fc1.weight"]).any() for r in sequential)  # it trained
    if algorithm == "feddst":  # the client step really used the gradients
        assert all(any(not torch.equal(r.mask[n], state.mask[n]) for n in state.mask) for r in sequential)


def test_vectorized_matches_sequential_with_frozen_weights():
    """PFFDST stage 2: after round 1 every non-zero weight is frozen; only the regrown ones train."""
    sim = simulation("pffdst", rounds=2)
    state, _ = sim.play_round(sim.initial_state())
    assert state.frozen and any(f.any() for f in state.frozen.values())
    tasks = tasks_for(sim, state)
    sequential, vectorized = run_both(sim, tasks, 2)
    assert_same_results(sequential, vectorized)
    for result in vectorized:  # frozen weights come back bitwise
        for name, frozen in state.frozen.items():
            assert torch.equal(result.weights[name][frozen], state.weights[name][frozen])


def test_group_size_does_not_change_results():
    sim = simulation("feddst", "Readjusting.readjust_every = 1", rounds=4)
    tasks = tasks_for(sim, sim.initial_state(), sizes=(7, 33, 50))
    whole = Vectorized().train(sim.job, tasks, context(sim, 1))
    pairs = Vectorized(group_size=2).train(sim.job, tasks, context(sim, 1))
    assert_same_results(whole, pairs)


class SmoothedL2(LocalObjective):
    """A third-party objective (label smoothing + an L2 term on the weights): the executor knows nothing of it."""

    def loss(self, logits, targets, params, global_params):
        l2 = sum((p ** 2).sum() for p in params.values())
        return F.cross_entropy(logits, targets, label_smoothing=0.1) + 1e-3 * l2


def test_any_per_sample_mean_objective_is_supported():
    sim = simulation("fedavg", rounds=4)
    sim.job.objective = SmoothedL2()
    sequential, vectorized = run_both(sim, tasks_for(sim, sim.initial_state()), 1)
    assert_same_results(sequential, vectorized)


def test_a_whole_round_through_the_engine_matches():
    bindings = ["Readjusting.readjust_every = 1", "Experiment.clients_per_round = 3"]
    seq = simulation("feddst", *bindings, rounds=4)
    vec = simulation("feddst", *bindings, "Experiment.executor = @Vectorized()", "Vectorized.group_size = 2",
                     rounds=4)
    assert isinstance(vec.experiment.executor, Vectorized) and vec.experiment.executor.group_size == 2
    (_, want, metrics_want), = play(seq, 1)
    (_, got, metrics_got), = play(vec, 1)
    assert metrics_got["train_loss"] == pytest.approx(metrics_want["train_loss"], rel=1e-5)
    assert metrics_got["uplink_bytes"] == metrics_want["uplink_bytes"]
    for name in want.weights:
        torch.testing.assert_close(got.weights[name], want.weights[name], rtol=0, atol=ATOL)
    for name in want.mask:
        assert torch.equal(got.mask[name], want.mask[name])


def test_batchnorm_models_fall_back_to_sequential_exactly():
    assert needs_sequential(ResNet18()) and not needs_sequential(LeNet())
    sim = simulation("fedavg", "Experiment.model = @ResNet18", "Experiment.batch_size = 4", rounds=4)
    tasks = tasks_for(sim, sim.initial_state(), sizes=(3, 6))
    sequential, vectorized = run_both(sim, tasks, 1)
    for want, got in zip(sequential, vectorized):  # the same code ran: bitwise equal, running stats included
        assert all(torch.equal(got.weights[name], want.weights[name]) for name in want.weights)


def test_group_size_is_validated():
    from fl_sparse.core.errors import ConfigError

    with pytest.raises(ConfigError, match="group_size"):
        Vectorized(group_size=-1)


@pytest.mark.skipif(not os.environ.get("FL_SPARSE_COMPILE_TESTS"),
                    reason="torch.compile takes ~30 s on a small CPU; set FL_SPARSE_COMPILE_TESTS=1")
def test_compiled_vectorized_matches_sequential():
    sim = simulation("feddst", "Readjusting.readjust_every = 1", rounds=4)
    sequential, vectorized = run_both(sim, tasks_for(sim, sim.initial_state()), 1, Vectorized(compile=True))
    assert_same_results(sequential, vectorized)
