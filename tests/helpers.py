"""Small builders shared by the tests: tiny, fast experiments on the embedded data, and the repository's scripts
(benchmarks/, tools/) loaded as modules."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from fl_sparse.config.compose import compose
from fl_sparse.engine.server import RoundServer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["Experiment.num_clients = 10", "Experiment.clients_per_round = 3", "Experiment.local_epochs = 1",
        "Experiment.eval_every = 1000"]


def simulation(algorithm: str, *bindings: str, rounds: int = 2, presets: tuple[str, ...] = ()) -> RoundServer:
    return RoundServer(compose(algorithm, list(presets), [f"ROUNDS = {rounds}", *TINY, *bindings]).experiment)


def play(sim: RoundServer, rounds: int | None = None):
    """Play rounds one by one; yields (state_before, state_after, metrics)."""
    state = sim.initial_state()
    for _ in range(rounds or sim.experiment.rounds):
        before = state
        state, metrics = sim.play_round(state)
        yield before, state, metrics


def load_script(relative_path: str):
    """A script of this repository that is not part of the package (e.g. ``tools/kernels_down.py``), as a module."""
    path = ROOT / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
