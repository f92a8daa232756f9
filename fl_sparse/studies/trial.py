"""One trial of a study, the same on every engine: lock, resume, run, export, mark done.

A trial's working folder is ``<output>/.work/trials/<key>/``:

* ``lock``             held (``flock``) while a process trains the trial, so two studies never train the same
  trial; the kernel releases it when that process dies
* ``checkpoints/``     the run's checkpoints; a trial that finds some resumes from the newest (into the same
  MLflow run, whose id the checkpoint keeps)
* ``mlflow_run_id``    the run's id, so a trial retried before its first checkpoint continues the same run
* ``done.json``        written last, after the export
* ``failed.json``      the one-line error of the last failed attempt

A trial is done when it has ``done.json`` or its export is committed in ``<output>/runs/<group>/<name>.json``
(under its key, or under none: an export made before studies). The working folder lives on one machine; the
exports are what the next machine finds.

Re-running a study *is* its resume: finished trials are skipped, interrupted ones continue from their own
checkpoints, and the final metrics equal those of an uninterrupted run bit for bit (on the CPU at the same
thread count), because every random draw of a run is keyed by its seed and round.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import time
from pathlib import Path
from typing import Callable

from fl_sparse.core.errors import FlSparseError, first_line
from fl_sparse.core.state import RoundEvent
from fl_sparse.studies.spec import Trial

LOCK_WAIT_S = 60.0  # a trial whose lock another process holds is waited for this long, then left to it


def work_folder(out: Path | str) -> Path:
    """A study's machine-local working folder inside its output folder (checkpoints, locks, its MLflow store,
    Ray's storage), ignored by git."""
    return Path(out) / ".work"


class TrialBusy(FlSparseError):
    """Another process holds the trial's lock: it is training the trial now."""


@dataclasses.dataclass(frozen=True)
class StudyContext:
    """What every trial of a study run needs besides itself (JSON-serialisable, for Ray workers)."""

    study: str  # the MLflow experiment
    out: str  # the study's output folder, absolute
    tracking_uri: str
    parent_run_id: str | None
    threads: int
    gpus: float
    checkpoint_every: int
    data_dir: str | None = None

    @property
    def work(self) -> Path:
        return work_folder(self.out)

    def folder(self, trial: Trial) -> Path:
        return self.work / "trials" / trial.key

    def export_folder(self, trial: Trial) -> Path:
        return Path(self.out) / "runs" / trial.group


@contextlib.contextmanager
def trial_lock(folder: Path, wait_s: float = LOCK_WAIT_S):
    """Hold the trial's lock, waiting up to ``wait_s`` for another holder (e.g. a worker of a killed study
    that is still shutting down); raises :class:`TrialBusy` if it is still held then."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "lock", "a") as handle:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TrialBusy(f"trial {folder.name} is being trained by another process (its lock in "
                                    f"{folder} is held); it is left to that process") from None
                time.sleep(0.5)
        yield


def is_locked(folder: Path) -> bool:
    """True while some process trains the trial (without taking the lock)."""
    if not (folder / "lock").exists():
        return False
    with open(folder / "lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


def read_marker(folder: Path, name: str) -> dict | None:
    try:
        return json.loads((folder / name).read_text())
    except (OSError, ValueError):
        return None


def _write_marker(folder: Path, name: str, data: dict) -> None:
    tmp = folder / f".{name}.tmp"
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, folder / name)


def finished(trial: Trial, context: StudyContext) -> dict | None:
    """The trial's ``done.json``, or what its committed export says, or None if it is not done."""
    done = read_marker(context.folder(trial), "done.json")
    if done is not None:
        return done
    export = read_marker(context.export_folder(trial), f"{trial.name}.json")
    if export is None or export.get("trial_key", trial.key) != trial.key:  # another composition: run it again
        return None
    rounds = _exported_rounds(context.export_folder(trial) / f"{trial.name}.csv")
    return {"key": trial.key, "run_id": export.get("run_id"), "rounds": rounds,
            "summary": f"exported ({rounds} rounds, run {export.get('run_id', '?')[:8]})"}


def _exported_rounds(table: Path) -> int:
    try:
        lines = table.read_text().splitlines()
    except OSError:
        return 0
    return int(lines[-1].split(",", 1)[0]) if len(lines) > 1 else 0


def run_trial(trial: Trial, context: StudyContext, on_round: Callable[[RoundEvent], None] | None = None) -> dict:
    """Train ``trial`` (or find it done) and return its ``done.json``: key, run id, rounds, summary line."""
    folder = context.folder(trial)
    done = finished(trial, context)
    if done is not None:
        return done
    with trial_lock(folder):
        done = finished(trial, context)  # finished while we waited for the lock
        if done is not None:
            return done
        try:
            done = _train(trial, context, folder, on_round)
        except BaseException as error:
            _write_marker(folder, "failed.json", {"key": trial.key, "error": first_line(error),
                                                  "type": type(error).__name__})
            raise
        (folder / "failed.json").unlink(missing_ok=True)
        _write_marker(folder, "done.json", done)
        return done


def _train(trial: Trial, context: StudyContext, folder: Path, on_round) -> dict:
    if context.gpus == 0:  # Ray sets CUDA_VISIBLE_DEVICES="" for gpu=0 trials today, but says this will change
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    from fl_sparse.config.compose import compose
    from fl_sparse.reporting.records import write
    from fl_sparse.runtime.callbacks import OnRound, OnStart
    from fl_sparse.runtime.runner import run
    from fl_sparse.tracking.export import run_record
    from fl_sparse.tracking.tracker import MlflowTracker

    torch.set_num_threads(context.threads)
    data = [f"DATA_DIR = {context.data_dir!r}"] if context.data_dir else []
    composed = compose(trial.algorithm, trial.presets, [*trial.bindings, *data])
    run_id_file = folder / "mlflow_run_id"
    known_run = run_id_file.read_text().strip() if run_id_file.is_file() else None
    tracker = MlflowTracker(context.tracking_uri, context.study, parent_run_id=context.parent_run_id,
                            tags={"study": context.study, "variant": trial.variant, "trial_key": trial.key,
                                  "group": trial.group}, run_id=known_run)
    callbacks = [tracker, OnStart(lambda start: run_id_file.write_text(tracker.run_id + "\n"))]
    if on_round is not None:
        callbacks.append(OnRound(on_round))
    checkpoints = folder / "checkpoints"
    resume = checkpoints if any(checkpoints.glob("round-*")) else None
    result = run(composed, callbacks, resume=resume, checkpoint_dir=checkpoints,
                 checkpoint_every=context.checkpoint_every)
    record = run_record(context.tracking_uri, tracker.run_id, {"group": trial.group, "trial_key": trial.key,
                                                                "variant": trial.variant})
    record.name = trial.name
    write([record], context.export_folder(trial))
    return {"key": trial.key, "run_id": tracker.run_id, "rounds": result.state.round,
            "stopped_by": result.stopped_by, "summary": result.summary_line(),
            "best_test_accuracy": result.best_test_accuracy, "gb": result.gb}
