"""The equal-communication budget of the table presets: FedDST's measured total for the column's round count.

The paper labels each column with a traffic figure (4 GB for LeNet, 34 GB for ResNet-18 at s = 0.9, ...)
that is its estimate of FedDST's traffic at a round count (200, 400, ... rounds). We measure real payloads
instead, so every table preset binds the same rule::

    Experiment.budget_gb = @feddst_budget_gb()
    feddst_budget_gb.rounds = %ROUNDS                     # FedDST's rounds in this column
    feddst_budget_gb.clients_per_round = 20
    feddst_budget_gb.bytes_per_client_round = 1448716     # FedDST's measured up + down bytes per client

``bytes_per_client_round`` is what :func:`fl_sparse.config.budget.measure_feddst_bytes` gives for the preset
(FedDST's round bytes
are the same every round: its mask keeps exact per-layer counts, and the codec's size depends on those
counts only). ``tests/test_budget_rule.py`` measures it again for every preset and fails when a model or
codec change makes the number stale. Every method then stops before a round that would exceed it.
"""

from __future__ import annotations

import math

import gin

from fl_sparse.core.errors import check


@gin.configurable
def feddst_budget_gb(rounds: int = gin.REQUIRED, clients_per_round: int = gin.REQUIRED,
                     bytes_per_client_round: int = gin.REQUIRED) -> float:
    """``rounds x clients_per_round x bytes_per_client_round`` in GB (1e9 bytes), rounded up to 0.1 MB, so that
    the float never falls below FedDST's own total: FedDST's last round always fits."""
    check(rounds >= 1 and clients_per_round >= 1 and bytes_per_client_round >= 1,
          f"feddst_budget_gb(rounds={rounds}, clients_per_round={clients_per_round}, bytes_per_client_round="
          f"{bytes_per_client_round}) needs positive integers; see fl_sparse/budget_rule.py")
    return math.ceil(rounds * clients_per_round * bytes_per_client_round / 1e5) / 1e4
