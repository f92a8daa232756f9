"""The run config that makes the server and every client build the same Experiment.

A Flower run carries its configuration in ``context.run_config`` (``[tool.flwr.app.config]`` of
``fl_sparse/flower/app/pyproject.toml``, overridden with ``flwr run ... -c key=value``). The gin composition
travels as three of its keys, so the ServerApp and each ClientApp parse exactly what ``fl-sparse run``
would: ``algorithm``, ``presets`` (comma-separated) and ``bindings`` (one gin binding per line).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

from fl_sparse.core.errors import ConfigError

if TYPE_CHECKING:
    from fl_sparse.config.compose import Composed
    from fl_sparse.engine.server import RoundServer

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
    # MLflow store of the server's run, as `fl-sparse run --tracking-uri` ("" = $MLFLOW_TRACKING_URI in the
    # SuperLink's environment, else no tracking); the same tracker as in-process, resumed into the same run
    "tracking-uri": "",
    "experiment-name": "fl_sparse",
    "progress": False,  # the server shows fl-sparse run's progress bar in its output (fl-sparse flower simulate)
    "summary-file": "",  # where the server writes fl-sparse run's closing lines after a successful run ("" = none)
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


def toml_value(value) -> str:
    """``value`` as TOML, as ``flwr run -c KEY=VALUE`` takes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def settings(run_config: Mapping[str, object]) -> dict[str, object]:
    """The run config with defaults filled in; an unknown key is a one-line error."""
    unknown = sorted(set(run_config) - set(DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown Flower run config keys {unknown}; the app understands {sorted(DEFAULTS)}")
    return {**DEFAULTS, **run_config}


@dataclasses.dataclass
class Built:
    """A composed experiment, its server side built, and what every process derives from it once."""

    composed: Composed
    server: RoundServer  # data loaded, model made, parts set up
    payload_limit: int  # messages.max_payload_bytes of the model: longer payloads are refused unread

    @property
    def config_text(self) -> str:
        return self.composed.config_text


def check_runs_on_flower(algorithm: str, experiment) -> None:
    """Refuse, in one line, a composition Flower cannot run: a discovery phase trains clients in one process
    before round 1, which would train the clients' data on the server."""
    if experiment.mask_discovery is not None:
        raise ConfigError(f"{algorithm}: Experiment.mask_discovery trains clients in one process before round 1, "
                          "which Flower cannot do yet; run it with fl-sparse run")


def build(composition: Composition, threads: int = 0, data_path: str | None = None) -> Built:
    """Compose ``composition`` as ``fl-sparse run`` does and build its server side: with the whole data set, or,
    given ``data_path`` (a SuperNode's), with only the partition in that folder (:mod:`fl_sparse.flower.partitions`)."""
    # torch and the engine load here, not at import: a ClientApp process answering a query never needs them.
    import torch

    from fl_sparse.config.compose import compose
    from fl_sparse.engine.server import RoundServer
    from fl_sparse.flower.messages import max_payload_bytes
    from fl_sparse.flower.partitions import load_partition

    if threads:
        torch.set_num_threads(threads)
    composed = compose(composition.algorithm, composition.presets, composition.bindings)
    check_runs_on_flower(composition.algorithm, composed.experiment)
    data = load_partition(Path(data_path), composed.experiment) if data_path else None
    server = RoundServer(composed.experiment, data)
    return Built(composed, server, max_payload_bytes(server.model.state_dict()))


# A process that serves many messages of one run (Flower's simulation runtime) parses and loads once.
# Only ClientApps use the cache: their parts keep no state between messages.
build_cached = functools.lru_cache(maxsize=1)(build)
