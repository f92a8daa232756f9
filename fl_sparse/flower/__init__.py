"""Flower deployment of fl_sparse compositions (``pip install 'fl-sparse[flower]'``).

The same gin composition (algorithm, presets, bindings) runs as a Flower ``ServerApp`` and ``ClientApp`` on
Flower's Message API: the server plays the engine's round (:class:`fl_sparse.engine.server.RoundServer` steps) and
sends each sampled client its downlink as our codec's bytes; the client decodes them, runs
:func:`fl_sparse.training.client.train_client` and sends back its encoded update. See ``docs/scale-out.md``.

* :mod:`fl_sparse.flower.serverapp`  ``app``: the ServerApp (``main(grid, context)``)
* :mod:`fl_sparse.flower.clientapp`  ``app``: the ClientApp (``@app.train()``, ``@app.query()``)
* :mod:`fl_sparse.flower.messages`       how our payloads ride in Flower messages, and what the server accepts
* :mod:`fl_sparse.flower.setup`      the run config -> the same Experiment on every process
* :mod:`fl_sparse.flower.partitions` per-node data: one folder per client, loaded by a SuperNode alone
* :mod:`fl_sparse.flower.local`      ``fl-sparse flower simulate``'s own SuperLink and SuperExec on this machine
* ``fl_sparse/flower/app/``          the Flower App directory ``flwr run`` builds (``pyproject.toml``)

Only this package imports ``flwr``; the engine and the parts never do.
"""

from __future__ import annotations

import logging
from pathlib import Path

from fl_sparse.core.errors import FlSparseError

APP_DIR = Path(__file__).resolve().parent / "app"


class MissingFlower(FlSparseError, ImportError):
    """flwr is not installed."""


def require_flwr() -> None:
    """Raise a one-line :class:`MissingFlower` unless the ``flower`` extra is installed."""
    try:
        import flwr  # noqa: F401
    except ImportError:
        raise MissingFlower("Flower is not installed: pip install 'fl-sparse[flower]'") from None


def log_flower_lines_once() -> None:
    """Let Flower's log lines print through its own console handler only. gin logs through the root logger when it
    parses a config, and that first call installs a stderr handler on the root (``logging.basicConfig``); from then
    on every Flower line propagated there too and printed twice."""
    logging.getLogger("flwr").propagate = False
