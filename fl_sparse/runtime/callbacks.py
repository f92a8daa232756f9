"""Run callbacks and their lifecycle.

:func:`fl_sparse.runtime.runner.run` calls every callback in this order:

1. ``on_run_start(start)`` once, after the server is built and a checkpoint (if resuming) is applied, before
   the first round is played. ``start.checkpoint_meta`` is what the callbacks asked the resumed checkpoint
   to keep ({} for a fresh run).
2. ``on_round_end(event)`` after every round, in the order the callbacks were given (a tracker before the
   checkpointer, so that a checkpointed round is always logged). Returning True stops the run after this round.
3. ``on_run_end(result)`` once, also when the run failed (``result.error`` is set) or was stopped.

``checkpoint_meta()`` is asked at every checkpoint for JSON data to keep in it (e.g. the MLflow run id).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

from fl_sparse.config.compose import Composed
from fl_sparse.core.state import RoundEvent, ServerState
from fl_sparse.engine.server import RoundServer


@dataclasses.dataclass
class RunStart:
    """What a run starts from."""

    composed: Composed
    server: RoundServer  # data loaded, model made, parts set up
    state: ServerState  # the initial state, or the resumed checkpoint's
    resumed_from: Path | None = None
    checkpoint_meta: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class RunResult:
    """How a run ended: its last state, why it stopped and its headline numbers."""

    state: ServerState
    planned_rounds: int
    stopped_by: str  # "rounds", "budget" or "callback" (fl_sparse.engine.loop), "error" when it failed
    best_test_accuracy: float = math.nan  # fraction, the highest evaluated over rounds (nan: never evaluated)
    best_round: int = 0
    final_test_accuracy: float = math.nan  # the last evaluated round's
    budget_gb: float | None = None
    operative_config: str = ""
    error: BaseException | None = None

    @property
    def gb(self) -> float:
        return self.state.cumulative_bytes / 1e9

    def __str__(self) -> str:
        return self.summary_line()

    def summary_line(self) -> str:
        """One line: rounds, why the run stopped, best and final test accuracy, GB communicated."""
        why = {"budget": f", stopped by the communication budget of {self.budget_gb} GB",
               "callback": ", stopped by a callback's stop signal", "error": ", FAILED"}.get(self.stopped_by, "")
        accuracy = ("no evaluation" if math.isnan(self.best_test_accuracy) else
                    f"test accuracy best {100 * self.best_test_accuracy:.2f} % (round {self.best_round}), "
                    f"final {100 * self.final_test_accuracy:.2f} %")
        return (f"finished {self.state.round} of {self.planned_rounds} rounds{why}: {accuracy}; "
                f"{self.gb:.4f} GB communicated")


class Callback:
    """A run observer. Every hook is optional; see the module docstring for the order they are called in."""

    def on_run_start(self, start: RunStart) -> None:
        pass

    def on_round_end(self, event: RoundEvent) -> bool | None:
        return None

    def on_run_end(self, result: RunResult) -> None:
        pass

    def checkpoint_meta(self) -> dict:
        return {}

    def __call__(self, event: RoundEvent) -> bool | None:
        """A callback is also a plain round callback of :func:`fl_sparse.engine.loop.run_rounds`."""
        return self.on_round_end(event)


class OnRound(Callback):
    """A plain function of each round's event as a callback (``callbacks=[OnRound(events.append)]``)."""

    def __init__(self, function: Callable[[RoundEvent], bool | None]):
        self.function = function

    def on_round_end(self, event: RoundEvent) -> bool | None:
        return self.function(event)


class OnStart(Callback):
    """A plain function of the run's start as a callback."""

    def __init__(self, function: Callable[[RunStart], None]):
        self.function = function

    def on_run_start(self, start: RunStart) -> None:
        self.function(start)
