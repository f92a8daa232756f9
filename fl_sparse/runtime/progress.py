"""The terminal progress bar of a run (tqdm)."""

from __future__ import annotations

import math

from tqdm import tqdm

from fl_sparse.core.state import RoundEvent
from fl_sparse.runtime.callbacks import Callback, RunResult, RunStart


class ProgressBar(Callback):
    """A tqdm bar showing round, last evaluated accuracy, cumulative GB and density."""

    def __init__(self):
        self.bar, self.accuracy = None, math.nan

    def on_run_start(self, start: RunStart) -> None:
        self.bar = tqdm(total=start.composed.experiment.rounds, initial=start.state.round, unit="round",
                        dynamic_ncols=True)

    def on_round_end(self, event: RoundEvent) -> None:
        if event.evaluated:
            self.accuracy = event.metrics["test_accuracy"]
        self.bar.set_postfix(acc=f"{self.accuracy:.3f}", GB=f"{event.metrics['cumulative_gb']:.4f}",
                             density=f"{event.metrics['density']:.3f}")
        self.bar.update(1)

    def on_run_end(self, result: RunResult) -> None:
        if self.bar is not None:
            self.bar.close()
