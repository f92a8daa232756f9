"""The Ray Tune engine of a study (the ``study`` extra: ``ray[tune]``); the only module of the study layer that
imports Ray.

Tune only schedules, retries and reports: each trial is a function trainable that calls
:func:`fl_sparse.studies.trial.run_trial`, which keeps its own checkpoints in its own folder and logs to MLflow
with the project's tracker, so a trial restarted by Tune (``FailureConfig``) resumes from its checkpoint into
the same MLflow run, and re-running the command is the study's resume (``Tuner.restore`` is not used: it cannot
add trials). Each trial reserves ``threads`` CPUs and ``gpus`` GPUs (fractions share a GPU).
"""

from __future__ import annotations

import dataclasses
import os
import time

import ray
from ray import tune

from fl_sparse.core.errors import ConfigError
from fl_sparse.studies.spec import Trial
from fl_sparse.studies.trial import StudyContext, run_trial

# Tune would change each trial's working directory to a Ray temp folder; every path here is absolute anyway.
os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # our progress view replaces Tune's 30 s status table
# A trial with gpus = 0 sets CUDA_VISIBLE_DEVICES itself (fl_sparse.studies.trial), as Ray will stop doing.
os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def _trainable(config: dict) -> None:
    """One trial in a Ray worker: every round is reported to Tune (the driver's progress view)."""
    context = StudyContext(**config["context"])
    trial = Trial.from_dict(config["trial"])
    done = run_trial(trial, context, lambda event: tune.report({"round": event.round}))
    tune.report({"round": done["rounds"], "finished": 1, "summary": done["summary"]})


class _Progress(tune.Callback):
    """Drives the study's progress view from Tune's trial events."""

    def __init__(self, progress, trials: list[Trial]):
        self.progress, self.by_key = progress, {trial.key: trial for trial in trials}

    def __getstate__(self) -> dict:  # Tune pickles its run config; only the driver's copy is ever called
        return {"progress": None, "by_key": self.by_key}

    @staticmethod
    def _key(trial) -> str:
        return trial.config["trial"]["key"]

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.progress.started(self._key(trial))

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if "round" in result:
            self.progress.round_done(self._key(trial), int(result["round"]))

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        self.progress.finished(self.by_key[self._key(trial)], result.get("summary", "finished"))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        error = str(getattr(trial, "error_msg", None) or "see the trial's log").strip().splitlines()
        self.progress.finished(self.by_key[self._key(trial)], f"FAILED: {error[-1] if error else 'error'}",
                               failed=True)

    def on_trial_restore(self, iteration, trials, trial, **info) -> None:  # a retry after a failure
        self.progress.started(self._key(trial))


def run_on_ray(trials: list[Trial], context: StudyContext, progress, max_failures: int,
               address: str | None = None, max_concurrent: int | None = None) -> None:
    """Run ``trials`` as Tune trials, longest first, on a local Ray or the cluster at ``address``."""
    if address is None and os.environ.get("RAY_ADDRESS"):
        raise ConfigError(f"RAY_ADDRESS={os.environ['RAY_ADDRESS']} is set: pass --ray-address to join that "
                          "cluster, or unset it to start a Ray on this machine")
    # Ray starts workers at nice 15, which starves trials on a host that does anything else; training is the
    # point of these workers (as in RayExecutor). A cluster's niceness is the cluster's own setting.
    local = {} if address else {"_system_config": {"worker_niceness": 0}}
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"RAY_CHDIR_TO_TRIAL_DIR": "0"}}, **local)
    try:
        order = sorted(trials, key=lambda trial: -trial.rounds)  # a grid_search list expands in list order
        resources = {"cpu": context.threads, "gpu": context.gpus}
        storage = context.work / "ray"
        storage.mkdir(parents=True, exist_ok=True)
        tuner = tune.Tuner(
            tune.with_resources(_trainable, resources),
            param_space={"trial": tune.grid_search([trial.as_dict() for trial in order]),
                         "context": dataclasses.asdict(context)},
            # reuse_actors: a worker that finished a trial takes the next one (no new process, no re-imports);
            # every trial composes its gin config and opens its MLflow run anew, so nothing carries over.
            tune_config=tune.TuneConfig(max_concurrent_trials=max_concurrent, reuse_actors=True),
            run_config=tune.RunConfig(name=f"{context.study}-{time.strftime('%Y%m%d-%H%M%S')}",
                                      storage_path=str(storage), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=max_failures),
                                      callbacks=[_Progress(progress, trials)]))
        tuner.fit()
    finally:
        ray.shutdown()
