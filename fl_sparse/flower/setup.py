"""The run config that makes the server and every client build the same Experiment.

A Flower run carries its configuration in ``context.run_config`` (``[tool.flwr.app.config]`` of
``fl_sparse/flower/app/pyproject.toml``, overridden with ``flwr run ... -c key=value``). The gin composition
travels as three of its keys, so the ServerApp and each ClientApp parse exactly what ``fl-sparse run``
would: ``algorithm``, ``presets`` (comma-separated) and ``bindings`` (one gin binding per line).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Mapping

from fl_sparse.errors import ConfigError

# Every key the app understands, with its default (Flower refuses `-c` overrides of keys not listed here,
# so fl_sparse/flower/app/pyproject.toml lists the same ones; tests/test_flower.py checks they agree).
DEFAULTS = {
    "algorithm": "pffdst",
    "presets": "",
    "bindings": "",
    "threads": 0,  # torch CPU threads on every process (0: torch's default)
    "round-timeout": 600.0,  # seconds the server waits for a round's replies; late clients count as rejected
    "node-wait": 120.0,  # seconds the server waits for enough SuperNodes to connect
    "checkpoint-dir": "",  # where the server writes checkpoints ("" = none)
    "checkpoint-every": 1,
    "resume": False,  # continue from the newest checkpoint in checkpoint-dir (same composition), as --resume does
    "metrics-file": "",  # a JSON-lines file of each round's metrics, written by the server ("" = none)
}


@dataclasses.dataclass(frozen=True)
class Composition:
    """An algorithm, its presets and extra bindings: what ``fl-sparse run ALGO PRESETS --bind ...`` takes."""

    algorithm: str
    presets: tuple[str, ...] = ()
    bindings: tuple[str, ...] = ()

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, object]) -> "Composition":
        config = settings(run_config)
        split = lambda text, sep: tuple(part.strip() for part in str(text).split(sep) if part.strip())  # noqa: E731
        return cls(str(config["algorithm"]), split(config["presets"], ","), split(config["bindings"], "\n"))

    def as_run_config(self) -> dict[str, str]:
        return {"algorithm": self.algorithm, "presets": ",".join(self.presets), "bindings": "\n".join(self.bindings)}


def settings(run_config: Mapping[str, object]) -> dict[str, object]:
    """The run config with defaults filled in; an unknown key is a one-line error."""
    unknown = sorted(set(run_config) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown Flower run config keys {unknown}; the app understands {sorted(DEFAULTS)}")
    return {**DEFAULTS, **run_config}


@dataclasses.dataclass
class Built:
    """A built experiment and what every process derives from it once."""

    simulation: object  # fl_sparse.engine.Simulation: data loaded, model made, parts set up
    config_text: str  # gin.config_str(), as checkpoints record it
    payload_limit: int  # wire.max_payload_bytes of the model: longer payloads are refused unread


def build(composition: Composition, threads: int = 0) -> Built:
    """Parse ``composition`` like ``fl-sparse run`` and build its Experiment and Simulation."""
    import gin
    import torch

    from fl_sparse import configs
    from fl_sparse.engine import Simulation
    from fl_sparse.experiment import Experiment
    from fl_sparse.flower.wire import max_payload_bytes

    if threads:
        torch.set_num_threads(threads)
    configs.parse(composition.algorithm, list(composition.presets), list(composition.bindings))
    simulation = Simulation(Experiment())
    return Built(simulation, gin.config_str(), max_payload_bytes(simulation.model.state_dict()))


# A process that serves many messages of one run (Flower's simulation runtime) parses and loads once.
# Only ClientApps use the cache: their parts keep no state between messages.
build_cached = functools.lru_cache(maxsize=1)(build)
