"""The round loop: seeding, sampling, byte accounting and determinism."""

import torch
from helpers import play, simulation

from fl_sparse.engine.loop import run_rounds


def test_sampling_is_seeded_and_without_replacement():
    sim = simulation("fedavg", "Experiment.num_clients = 10", "Experiment.clients_per_round = 7")
    for r in range(1, 20):
        clients = sim.sample_clients(r)
        assert len(set(clients)) == 7 and all(0 <= c < 10 for c in clients)
        assert clients == sim.sample_clients(r)
    assert len({tuple(sim.sample_clients(r)) for r in range(1, 20)}) > 1


def test_same_seeds_give_identical_metrics_and_weights():
    def run():
        sim = simulation("fedavgm", rounds=2)
        *_, (_, state, metrics) = play(sim)
        return state, metrics

    (state_a, metrics_a), (state_b, metrics_b) = run(), run()
    metrics_a.pop("round_seconds"), metrics_b.pop("round_seconds")
    assert metrics_a == metrics_b
    assert all(torch.equal(state_a.weights[k], state_b.weights[k]) for k in state_a.weights)


def test_different_seed_changes_the_run():
    a = simulation("fedavg", "Experiment.seed = 1", rounds=1)
    b = simulation("fedavg", "Experiment.seed = 2", rounds=1)
    assert not torch.equal(a.initial_state().weights["fc1.weight"], b.initial_state().weights["fc1.weight"])


def test_bytes_are_measured_from_payloads_and_accumulate():
    sim = simulation("fedavg", rounds=2)
    total = 0
    dense_bytes = sum(t.numel() * 4 for t in sim.initial_state().weights.values())
    for _, state, metrics in play(sim):
        total += metrics["uplink_bytes"] + metrics["downlink_bytes"]
        assert metrics["uplink_bytes_per_client"] > dense_bytes  # dense values plus the payload header
        assert metrics["uplink_bytes_per_client"] < dense_bytes * 1.01
        assert state.cumulative_bytes == total
        assert metrics["cumulative_gb"] == total / 1e9


def test_fedavg_learns_on_the_embedded_data():
    sim = simulation("fedavg", "Experiment.num_clients = 4", "Experiment.clients_per_round = 4",
                     "Experiment.dirichlet_alpha = 100.0", "Experiment.local_epochs = 2", rounds=6)
    state = run_rounds(sim).state
    from fl_sparse.training.client import evaluate

    assert evaluate(sim.model, state.weights, sim.data)["test_accuracy"] > 0.2  # chance is 0.1


def test_partition_init_and_sampling_seeds_are_separate():
    base = simulation("fedavg", "Experiment.seed = 3", rounds=1)
    moved = simulation("fedavg", "Experiment.seed = 3", "Experiment.sampling_seed = 9", rounds=1)
    assert [c.tolist() for c in base.data.client_train] == [c.tolist() for c in moved.data.client_train]
    assert torch.equal(base.initial_state().weights["fc1.weight"], moved.initial_state().weights["fc1.weight"])
    assert [base.sample_clients(r) for r in range(1, 6)] != [moved.sample_clients(r) for r in range(1, 6)]
    repartitioned = simulation("fedavg", "Experiment.seed = 3", "Experiment.partition_seed = 9", rounds=1)
    assert [c.tolist() for c in base.data.client_train] != [c.tolist() for c in repartitioned.data.client_train]
    assert torch.equal(base.initial_state().weights["fc1.weight"], repartitioned.initial_state().weights["fc1.weight"])
    reinit = simulation("fedavg", "Experiment.seed = 3", "Experiment.init_seed = 9", rounds=1)
    assert not torch.equal(base.initial_state().weights["fc1.weight"], reinit.initial_state().weights["fc1.weight"])
    assert [base.sample_clients(r) for r in range(1, 6)] == [reinit.sample_clients(r) for r in range(1, 6)]


def test_a_broadcast_payload_is_encoded_once_and_counted_per_client(monkeypatch):
    """The downlink codec's shared payload must give the same round as encoding for every client."""
    from fl_sparse.parts.codecs import SparseBitmask

    def one_round(shared: bool):
        monkeypatch.setattr(SparseBitmask, "same_for_every_client", lambda self, link: shared)
        sim = simulation("feddst", "Experiment.downlink_codec = @SparseBitmask()", rounds=1)
        encodes = []
        original = SparseBitmask.encode

        def counting_encode(self, message, link):
            encodes.append(link)
            return original(self, message, link)

        monkeypatch.setattr(SparseBitmask, "encode", counting_encode)
        [(_, state, metrics)] = play(sim)
        monkeypatch.setattr(SparseBitmask, "encode", original)
        return state, metrics, len(encodes)

    state_once, metrics_once, encodes_once = one_round(True)
    state_each, metrics_each, encodes_each = one_round(False)
    assert encodes_each == encodes_once + 2  # 3 clients per round in the tiny setting
    per_client = metrics_once["downlink_bytes_per_client"]
    assert metrics_once["downlink_bytes"] == metrics_each["downlink_bytes"] == 3 * per_client
    assert all(torch.equal(state_once.weights[k], state_each.weights[k]) for k in state_once.weights)
