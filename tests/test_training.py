"""``train_client``'s own fast paths give the numbers of the plain ones, bitwise.

``train_client`` normalises a client's images once (not once per batch of every epoch) and updates its
weights in place. Both are the same elementwise operations on the same values, in the same layout and with the
same kernels, so the results must not move by a single bit; these tests compare within one process."""

import pytest
import torch
from helpers import simulation
from test_executors import context, tasks_for

from fl_sparse.parts.executors.sequential import Sequential
from fl_sparse.training import client as training

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("algorithm, bindings", [
    ("feddst", ["Readjusting.readjust_every = 1"]),  # the readjustment's gradient pass reads batches too
    ("fedprox", ["Proximal.mu = 0.5", "Experiment.local_epochs = 2"]),
])
def test_normalising_once_per_client_equals_normalising_every_batch(monkeypatch, algorithm, bindings):
    sim = simulation(algorithm, *bindings, rounds=4)
    state = sim.initial_state()
    tasks = tasks_for(sim, state)
    once = Sequential().train(sim.job, tasks, context(sim, 1))
    monkeypatch.setattr(training, "CLIENT_INPUTS_BYTES", 0)  # every client now takes the per-batch path
    per_batch = Sequential().train(sim.job, tasks, context(sim, 1))
    for a, b in zip(once, per_batch):
        assert a.train_loss == b.train_loss
        for name in a.weights:
            assert torch.equal(a.weights[name], b.weights[name]), name
        for name in a.mask:
            assert torch.equal(a.mask[name], b.mask[name]), name
    assert any(not torch.equal(r.weights["fc1.weight"], state.weights["fc1.weight"]) for r in once)  # it trained


def test_clients_sharing_received_weights_leave_them_untouched():
    """Clients of a broadcast round share one decoded downlink; training updates its own copy in place."""
    sim = simulation("feddst", rounds=4)
    state = sim.initial_state()
    received = {name: t.clone() for name, t in state.weights.items()}
    tasks = tasks_for(sim, state)
    assert all(task.weights is state.weights for task in tasks)
    first = Sequential().train(sim.job, tasks, context(sim, 1))
    for name in received:
        assert torch.equal(state.weights[name], received[name]), name
    again = Sequential().train(sim.job, tasks, context(sim, 1))  # the same tasks train to the same weights
    for a, b in zip(first, again):
        for name in a.weights:
            assert torch.equal(a.weights[name], b.weights[name]), name


def test_batch_order_is_the_batch_positions_in_the_clients_indices():
    sim = simulation("fedavg", rounds=4)
    task = tasks_for(sim, sim.initial_state(), sizes=(70,))[0]
    positions = training.batch_positions(task, 2, 32)
    assert [len(p) for p in positions] == [32, 32, 6, 32, 32, 6]
    assert all(sorted(torch.cat(positions[i:i + 3]).tolist()) == list(range(70)) for i in (0, 3))
    for index, at in zip(training.batch_order(task, 2, 32), positions):
        assert torch.equal(index, task.indices[at])


class _SumOfTwo(torch.nn.Module):
    """Logits = a + b: autograd returns the same tensor as the gradient of both."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(1, 10))
        self.b = torch.nn.Parameter(torch.zeros(1, 10))

    def forward(self, x):
        return self.a + self.b + 0 * x.flatten(1)[:, :10].sum()


def test_gradients_that_autograd_shares_come_back_apart():
    from fl_sparse.parts.objectives import SGD, CrossEntropy

    job = training.TrainingJob(_SumOfTwo(), None, CrossEntropy(), SGD(), None, 1, 1)
    params = {name: torch.randn(1, 10) for name in ("a", "b")}
    x, y = torch.randn(1, 3, 4, 4), torch.tensor([3])
    logits = (params["a"] + params["b"]).requires_grad_()
    want = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, y), logits)[0]
    grads, _ = job.grads_and_loss(params, {}, params, x, y)
    assert grads["a"].untyped_storage().data_ptr() != grads["b"].untyped_storage().data_ptr()
    state = job.optimizer.init(params)
    before = {name: p.clone() for name, p in params.items()}
    params, state = job.optimizer.step_in_place(params, grads, state, {})
    for name in params:  # each parameter moved by its own gradient, not by the other one's update
        torch.testing.assert_close(params[name], before[name] - 0.01 * (want + 1e-3 * before[name]), rtol=0, atol=1e-7)
