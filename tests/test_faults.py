"""Faulty clients are rejected and counted; the round goes on with the others."""

import dataclasses

import pytest
import torch
from helpers import play, simulation

from fl_sparse.cli.main import main
from fl_sparse.engine.loop import run_rounds
from fl_sparse.parts.executors.sequential import Sequential


class Saboteur(Sequential):
    """Trains normally, then damages the results of the chosen positions."""

    def __init__(self, damage: dict[int, str]):
        self.damage = damage

    def train(self, job, tasks, ctx):
        results = super().train(job, tasks, ctx)
        for position, kind in self.damage.items():
            weights = dict(results[position].weights)
            if kind == "nan":
                held = results[position].mask.get("fc1.weight")  # a coordinate the codec transmits
                first = 0 if held is None else int(held.flatten().nonzero()[0])
                weights["fc1.weight"] = weights["fc1.weight"].clone()
                weights["fc1.weight"].view(-1)[first] = float("nan")
            elif kind == "inf":
                weights["fc3.bias"] = torch.full_like(weights["fc3.bias"], float("inf"))
            elif kind == "shape":
                weights["fc2.bias"] = torch.zeros(3)
            results[position] = dataclasses.replace(results[position], weights=weights)
        return results


@pytest.mark.parametrize("algorithm", ["fedavg", "pffdst"])
def test_bad_updates_are_rejected_and_the_others_aggregated(algorithm):
    sim = simulation(algorithm, "Experiment.clients_per_round = 4", rounds=2)
    sim.experiment.executor = Saboteur({0: "nan", 1: "inf", 2: "shape"})
    with pytest.warns(UserWarning, match="rejected"):
        before, after, metrics = next(play(sim))
    assert metrics["rejected_clients"] == 3
    assert all(torch.isfinite(w).all() for w in after.weights.values() if w.is_floating_point())
    assert not torch.equal(before.weights["fc1.bias"], after.weights["fc1.bias"])  # client 3 got through


def test_a_round_where_every_client_fails_leaves_the_model_unchanged():
    sim = simulation("fedavgm", "Experiment.clients_per_round = 2", rounds=1)
    sim.experiment.executor = Saboteur({0: "nan", 1: "shape"})
    with pytest.warns(UserWarning, match="every client update was rejected; the global model is unchanged"):
        [(before, after, metrics)] = play(sim)
    assert metrics["rejected_clients"] == 2 and after.round == 1
    assert all(torch.equal(before.weights[k], after.weights[k]) for k in before.weights)


def test_budget_stops_before_the_round_that_would_exceed_it(tmp_path, monkeypatch, capsys):
    per_round = next(play(simulation("fedavg", rounds=1)))[2]
    round_gb = (per_round["uplink_bytes"] + per_round["downlink_bytes"]) / 1e9
    budget = 2.5 * round_gb
    sim = simulation("fedavg", f"Experiment.budget_gb = {budget}", rounds=5)
    end = run_rounds(sim)
    state = end.state
    assert state.round == 2 and end.stopped_by == "budget"
    assert state.cumulative_bytes <= budget * 1e9
    monkeypatch.chdir(tmp_path)
    assert main(["run", "fedavg", "--rounds", "5", "--no-tracking", "--budget-gb", str(budget),
                 "--bind", "Experiment.num_clients=10", "--bind", "Experiment.clients_per_round=3",
                 "--bind", "Experiment.local_epochs=1"]) == 0
    assert "stopped by the communication budget" in capsys.readouterr().out
