"""Running a study: the trials still to do, on an engine, under one MLflow parent run, with one progress view.

Engines: ``serial`` trains the trials one after another in this process (no Ray: CI, debugging, one-core
hosts); ``ray`` hands them to Ray Tune (:mod:`fl_sparse.studies.tune_engine`), which fills this machine's
cores, joins a cluster with ``--ray-address`` and puts trials on fractional GPUs. Both run
:func:`fl_sparse.studies.trial.run_trial`, so a trial's results do not depend on the engine.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
from pathlib import Path

from tqdm import tqdm

from fl_sparse.core.errors import ConfigError, first_line
from fl_sparse.core.state import RoundEvent
from fl_sparse.studies.spec import Study, Trial
from fl_sparse.studies.trial import (
    StudyContext,
    TrialBusy,
    finished,
    is_locked,
    read_marker,
    run_trial,
    work_folder,
)
from fl_sparse.tracking.export import STUDY_PARENT_TAG
from fl_sparse.tracking.tracker import close_parent_run, open_parent_run

DONE, RUNNING, PENDING, FAILED = "done", "running", "pending", "failed"


@dataclasses.dataclass
class TrialState:
    trial: Trial
    state: str  # done, running, pending or failed
    rounds: int  # rounds done (from the newest checkpoint, or all of them when done)
    detail: str = ""  # the summary line when done, the error when failed


def trial_states(study: Study, out: Path) -> list[TrialState]:
    """Where every trial of the study stands, from its working folder alone (nothing is started)."""
    context = StudyContext(study.name, str(out), "", None, study.threads, study.gpus, study.checkpoint_every)
    states = []
    for trial in study.trials:
        folder = context.folder(trial)
        done, failed = finished(trial, context), read_marker(folder, "failed.json")
        checkpoints = sorted(folder.glob("checkpoints/round-*"))
        rounds = int(checkpoints[-1].name.split("-")[1]) if checkpoints else 0
        if done is not None:
            states.append(TrialState(trial, DONE, done["rounds"], done["summary"]))
        elif is_locked(folder):
            states.append(TrialState(trial, RUNNING, rounds))
        elif failed is not None:
            states.append(TrialState(trial, FAILED, rounds, failed["error"]))
        else:
            states.append(TrialState(trial, PENDING, rounds))
    return states


class StudyProgress:
    """One view of the whole study: a bar of rounds over all trials (with ETA), trials done / running /
    pending / failed, and one line per finished trial."""

    def __init__(self, states: list[TrialState]):
        self.planned = {s.trial.key: s.trial.rounds for s in states}
        self.done_rounds = {s.trial.key: (s.trial.rounds if s.state == DONE else s.rounds) for s in states}
        self.counts = {DONE: sum(s.state == DONE for s in states), RUNNING: 0, FAILED: 0}
        self.total = len(states)
        self.bar = tqdm(total=sum(self.planned.values()), initial=sum(self.done_rounds.values()), unit="round",
                        dynamic_ncols=True)
        self._postfix()

    def _postfix(self) -> None:
        pending = self.total - self.counts[DONE] - self.counts[RUNNING] - self.counts[FAILED]
        self.bar.set_postfix_str(f"trials done {self.counts[DONE]}/{self.total}, running {self.counts[RUNNING]}, "
                                 f"pending {pending}, failed {self.counts[FAILED]}")

    def started(self, key: str) -> None:
        self.counts[RUNNING] += 1
        self._postfix()

    def round_done(self, key: str, round: int) -> None:
        step = max(0, min(round, self.planned[key]) - self.done_rounds[key])
        self.done_rounds[key] += step
        self.bar.update(step)

    def finished(self, trial: Trial, line: str, failed: bool = False) -> None:
        self.counts[RUNNING] -= 1
        self.counts[FAILED if failed else DONE] += 1
        self.round_done(trial.key, self.planned[trial.key])  # a budget may end a trial before its planned rounds
        self.bar.update(0)
        tqdm.write(f"{trial.group}/{trial.name} [{trial.key}]: {line}")
        self._postfix()

    def close(self) -> None:
        self.bar.close()


def select(study: Study, only: list[str] | None) -> Study:
    """The study restricted to the trials whose ``group/name`` (e.g. ``table1_12gb/pffdst_s0``) or key matches
    one of the shell patterns ``only`` (all of them without)."""
    if not only:
        return study
    chosen = tuple(t for t in study.trials if any(fnmatch.fnmatch(f"{t.group}/{t.name}", pattern)
                                                  or fnmatch.fnmatch(t.key, pattern) for pattern in only))
    if not chosen:
        raise ConfigError(f"--only {' '.join(only)}: no trial of {study.path} matches; patterns match GROUP/NAME "
                          "(e.g. 'table1_12gb/*') or a trial key, as fl-sparse study status lists them")
    return dataclasses.replace(study, trials=chosen)


def run_study(study: Study, out: Path, engine: str, tracking_uri: str, data_dir: str | None = None,
              ray_address: str | None = None, max_concurrent: int | None = None) -> list[TrialState]:
    """Train every trial that is not done yet; returns the trials' states afterwards."""
    out = out.resolve()
    states = trial_states(study, out)
    todo = [s.trial for s in states if s.state != DONE]
    work = work_folder(out)
    work.mkdir(parents=True, exist_ok=True)
    parent = _parent_run(study, work, tracking_uri)
    context = StudyContext(study.name, str(out), tracking_uri, parent, study.threads, study.gpus,
                           study.checkpoint_every, str(Path(data_dir).resolve()) if data_dir else None)
    progress = StudyProgress(states)
    try:
        if todo and engine == "serial":
            _run_serial(todo, context, progress, study.max_failures)
        elif todo:
            from fl_sparse.studies.tune_engine import run_on_ray

            run_on_ray(todo, context, progress, study.max_failures, ray_address, max_concurrent)
    finally:
        progress.close()
        final = trial_states(study, out)
        close_parent_run(tracking_uri, parent, all(s.state == DONE for s in final))
    return final


def _parent_run(study: Study, work: Path, tracking_uri: str) -> str:
    """The study's MLflow parent run (the same one on every re-run), opened for the trials to nest under."""
    record = work / "study.json"
    known = json.loads(record.read_text()) if record.is_file() else {}
    run_id = open_parent_run(tracking_uri, study.name, known.get("parent_run_id"),
                             {STUDY_PARENT_TAG: study.name, "study_file": study.path.name})
    record.write_text(json.dumps({"parent_run_id": run_id, "tracking_uri": tracking_uri}, indent=1) + "\n")
    return run_id


def _run_serial(trials: list[Trial], context: StudyContext, progress: StudyProgress, max_failures: int) -> None:
    for trial in trials:
        progress.started(trial.key)

        def on_round(event: RoundEvent, key: str = trial.key) -> None:
            progress.round_done(key, event.round)

        for attempt in range(max_failures + 1):
            try:
                done = run_trial(trial, context, on_round)
            except TrialBusy as error:
                progress.finished(trial, first_line(error), failed=True)
                break
            except Exception as error:  # noqa: BLE001  (one line, then a retry or the next trial)
                if attempt < max_failures:
                    tqdm.write(f"{trial.group}/{trial.name} [{trial.key}]: attempt {attempt + 1} failed "
                               f"({type(error).__name__}: {first_line(error)}); retrying from its checkpoint")
                    continue
                progress.finished(trial, f"FAILED: {type(error).__name__}: {first_line(error)}", failed=True)
                break
            progress.finished(trial, done["summary"])
            break
