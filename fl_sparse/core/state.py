"""The state types a run passes between its layers: the server's state after a round (what a checkpoint
holds) and the event the round loop reports to its callbacks."""

from __future__ import annotations

import dataclasses

from fl_sparse.core.interfaces import Tensors


@dataclasses.dataclass
class ServerState:
    """Everything that changes from round to round (and what a checkpoint holds)."""

    weights: Tensors
    mask: Tensors
    frozen: Tensors
    round: int = 0  # last completed round
    freeze_version: int = 0
    cumulative_bytes: int = 0
    cumulative_flops: float = 0.0


@dataclasses.dataclass
class RoundEvent:
    """What the round loop reports after each round to its callbacks (progress bar, MLflow, checkpoints)."""

    round: int
    metrics: dict[str, float]
    state: ServerState
    evaluated: bool
