"""Running a composed experiment: build the server, resume from a checkpoint, play the rounds, checkpoint.

:func:`run` is the one run path: the command line, the public API (``fl_sparse.run``) and Flower's ServerApp
(with its own round player) all go through it, so resuming and checkpointing work the same everywhere.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import gin

from fl_sparse.config.compose import Composed
from fl_sparse.core.state import RoundEvent, ServerState
from fl_sparse.engine.loop import PlayRound, run_rounds
from fl_sparse.engine.server import RoundServer
from fl_sparse.runtime import checkpoint
from fl_sparse.runtime.callbacks import Callback, RunResult, RunStart

log = logging.getLogger("fl_sparse")


class _Headline(Callback):
    """Follows the evaluated test accuracy for the run's summary line."""

    def __init__(self):
        self.best, self.best_round, self.final = math.nan, 0, math.nan

    def on_round_end(self, event: RoundEvent) -> None:
        if event.evaluated and "test_accuracy" in event.metrics:
            self.final = event.metrics["test_accuracy"]
            if not self.final <= self.best:  # the first evaluation, or a better one
                self.best, self.best_round = self.final, event.round


def run(composed: Composed, callbacks: list[Callback] = (), *, resume: Path | str | None = None,
        checkpoint_dir: Path | str | None = None, checkpoint_every: int | None = None,
        server: RoundServer | None = None, play_round: PlayRound | None = None) -> RunResult:
    """Play ``composed``'s rounds and return how the run ended.

    ``resume``: continue the run checkpointed in that directory (the same composition, checked before any
    data is loaded), checkpointing there every ``checkpoint_every`` rounds (default: as before).
    ``checkpoint_dir`` / ``checkpoint_every``: checkpoint a fresh run. ``server``: an already built
    :class:`RoundServer` of ``composed`` (default: built here). ``play_round``: another player of the round's
    steps (Flower's remote clients); default: the server's in-process clients."""
    state, meta = None, {}
    if resume is not None:
        state, meta = checkpoint.read(Path(resume), composed.config_text)
    server = server or RoundServer(composed.experiment)
    state = checkpoint.apply(server, state, meta) if resume is not None else server.initial_state()
    headline, callbacks = _Headline(), list(callbacks)
    directory = resume if resume is not None else checkpoint_dir
    if directory is not None and (checkpoint_every or resume is not None):
        every = checkpoint_every or meta["checkpoint_every"]
        callbacks.append(checkpoint.Checkpointer(Path(directory), every, server, composed.config_text, callbacks))
    callbacks.append(headline)
    start = RunStart(composed, server, state, None if resume is None else Path(resume), meta)
    exp = composed.experiment

    def result(last: ServerState, stopped_by: str, error: BaseException | None = None) -> RunResult:
        return RunResult(last, exp.rounds, stopped_by, headline.best, headline.best_round, headline.final,
                         exp.budget_gb, gin.operative_config_str(), error)

    try:
        for callback in callbacks:
            callback.on_run_start(start)
        end = run_rounds(server, state, [callback.on_round_end for callback in callbacks], play_round)
    except BaseException as error:
        failed = result(state, "error", error)
        for callback in callbacks:
            try:
                callback.on_run_end(failed)
            except Exception:  # noqa: BLE001  (the run's own error is the one to report)
                log.exception("a callback failed while the run was ending after an error")
        raise
    ended = result(end.state, end.stopped_by)
    for callback in callbacks:
        callback.on_run_end(ended)
    log.info("%s", ended.summary_line())
    return ended
