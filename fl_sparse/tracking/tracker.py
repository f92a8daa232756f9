"""The MLflow tracker: a run callback that logs a run's config, tags, per-round metrics and summary artifacts."""

from __future__ import annotations

import contextlib
import logging
import math
import tempfile
import time
from pathlib import Path

import mlflow

from fl_sparse.core.errors import first_line
from fl_sparse.core.state import RoundEvent
from fl_sparse.reporting import run_details
from fl_sparse.reporting.plots import accuracy_plots
from fl_sparse.runtime.callbacks import Callback, RunResult, RunStart
from fl_sparse.tracking.links import HOST, run_url, tag_experiment
from fl_sparse.tracking.store import TrackingError, store_lock

# Attempts at one MLflow call that failed on a locked sqlite database. Each attempt already waits up to
# 20 s inside sqlite (MLflow sets PRAGMA busy_timeout = 20000 on every session); the retries cover runs
# that hold the database longer than that, e.g. several runs committing their params at once.
LOCKED_RETRIES = 4
LOCKED_BACKOFF_S = 0.5


class MlflowTracker(Callback):
    """Logs one run: every gin binding as a param, the config texts as artifacts, tags to filter by, the
    per-round metrics (evaluation metrics only in the rounds that computed them) and, at the end, the final
    per-layer table and the accuracy plots. A resumed run continues the MLflow run its checkpoint names.
    Any failure of the store is raised as one :class:`TrackingError`."""

    def __init__(self, uri: str, experiment_name: str, parent_run_id: str | None = None,
                 tags: dict[str, str] | None = None, run_id: str | None = None):
        """``parent_run_id``: nest the run under it (a study's run). ``tags``: more tags to set on a new run.
        ``run_id``: continue this run when no checkpoint names one (a study trial retried before its first
        checkpoint)."""
        logging.getLogger("mlflow").setLevel(logging.WARNING)  # keep the terminal to the progress bar
        # MLflow logs every sqlite OperationalError ("database is locked") with a traceback before raising
        # it; the retry below handles it, and a lasting failure is reported as one TrackingError line.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        self.uri, self.experiment_name = uri, experiment_name
        self.parent_run_id, self.extra_tags, self.resume_run_id = parent_run_id, dict(tags or {}), run_id
        self.client = self.run = self.run_id = None
        self.last_state = None  # the final global model's mask and frozen set go into layers.md

    def on_run_start(self, start: RunStart) -> None:
        composed = start.composed
        resume_run_id = start.checkpoint_meta.get("mlflow_run_id") or self.resume_run_id
        self.open(run_details.run_name(composed.name, list(composed.presets), composed.experiment), resume_run_id)
        if resume_run_id is None:
            tags = run_details.run_tags(composed.name, list(composed.presets), composed.experiment,
                                        str(start.server.device))
            self.log_config(composed.params, composed.config_text,
                            {**tags, "data": start.server.data.source, **self.extra_tags})

    def open(self, run_name: str, resume_run_id: str | None = None) -> None:
        """Create or open the store, then start the run (or reopen an interrupted one)."""
        with store_lock(self.uri):  # creating the client creates (and migrates) the store
            self.client = self._call("open the store", mlflow.MlflowClient, self.uri)
            mlflow.set_tracking_uri(self.uri)
            if resume_run_id:  # continue the interrupted run; rounds after its checkpoint are logged again
                self.run = self._call("reopen the run", mlflow.start_run, run_id=resume_run_id)
            else:
                experiment = self._call("set the experiment", mlflow.set_experiment, self.experiment_name)
                # the UI opens the experiment as model training, with a chart view against GB
                self._call("tag the experiment", tag_experiment, self.client, experiment.experiment_id)
                self.run = self._call("start the run", mlflow.start_run, run_name=run_name,
                                      parent_run_id=self.parent_run_id)
        self.run_id = self.run.info.run_id

    def checkpoint_meta(self) -> dict:
        return {"mlflow_run_id": self.run_id}

    def _call(self, what: str, function, *args, retries: int = LOCKED_RETRIES, **kwargs):
        """``function(*args, **kwargs)``, retried while sqlite reports the database locked."""
        for attempt in range(retries + 1):
            try:
                return function(*args, **kwargs)
            except Exception as error:  # noqa: BLE001  (the store's failures come in many types)
                if "database is locked" in str(error) and attempt < retries:
                    time.sleep(LOCKED_BACKOFF_S * 2**attempt)
                    continue
                raise TrackingError(f"MLflow tracking at {self.uri} failed to {what}: "
                                    f"{type(error).__name__}: {first_line(error)}") from None

    def log_config(self, params: dict[str, str], config_text: str, tags: dict[str, str]) -> None:
        items = list(params.items())
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._call("log params", mlflow.log_params, dict(items[start:start + 100]))
        self._call("log the config", mlflow.log_text, config_text, "config.gin")
        self._call("set tags", mlflow.set_tags, tags)

    def on_round_end(self, event: RoundEvent) -> None:
        finite = {key: value for key, value in event.metrics.items() if math.isfinite(value)}
        self._call(f"log round {event.round}", mlflow.log_metrics, finite, step=event.round)
        self.last_state = event.state

    def on_run_end(self, result: RunResult) -> None:
        if self.run is None:  # the store never opened
            return
        if result.error is None:
            self.finish(result.operative_config)
        else:
            self.abandon(result.operative_config)

    def finish(self, operative_config: str, status: str = "FINISHED") -> None:
        self._call("log the operative config", mlflow.log_text, operative_config, "operative_config.gin")
        self._call("log the summary artifacts", self._log_summary)
        self._call("end the run", self._end_run, status)

    def _log_summary(self) -> None:
        """layers.md (final per-layer density and frozen fraction) and the accuracy plots, drawn from the
        run's whole logged history (a resumed run included)."""
        if self.last_state is not None:
            mlflow.log_text(run_details.layer_table(self.last_state), "layers.md")
        history = {key: [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]
                   for key in run_details.PLOT_METRICS}
        tags = self.client.get_run(self.run_id).data.tags
        with tempfile.TemporaryDirectory() as folder:
            plots = accuracy_plots(history, tags.get("algorithm", "?"),
                                   [p for p in tags.get("presets", "").split(",") if p], Path(folder))
            for plot in plots:
                mlflow.log_artifact(str(plot), "plots")

    def _end_run(self, status: str) -> None:
        # mlflow.end_run forgets the active run before it writes the status, so a retry writes it directly.
        if mlflow.active_run() is not None:
            mlflow.end_run(status=status)
        else:
            self.client.set_terminated(self.run_id, status)

    def abandon(self, operative_config: str) -> None:
        """Mark the run FAILED if the store still answers (the failure may be the store's own), without
        retries; the active run is forgotten either way, so this process can start another."""
        for what, function, args in [("log the operative config", mlflow.log_text,
                                      (operative_config, "operative_config.gin")),
                                     ("end the run", self._end_run, ("FAILED",))]:
            with contextlib.suppress(TrackingError):
                self._call(what, function, *args, retries=0)

    def how_to_open(self) -> str:
        """Where to see the run: its URL on a tracking server, or the command that serves a local store."""
        experiment_id = self.run.info.experiment_id
        if self.uri.startswith(("http:", "https:")):  # the store is a server with its own UI
            return f"MLflow run {self.run_id}: {run_url(self.uri.rstrip('/'), experiment_id, self.run_id)}"
        store = self.uri if self.uri.startswith(("sqlite:", "postgresql:", "mysql:")) else Path(self.uri).as_uri()
        return (f"MLflow run {self.run_id}\n  open it: fl-sparse ui --tracking-uri {store}  "
                f"(pip install 'fl-sparse[server]'), then {run_url(f'http://{HOST}:5000', experiment_id, self.run_id)}")


def open_parent_run(uri: str, experiment_name: str, run_id: str | None, tags: dict[str, str]) -> str:
    """A study's parent run: ``run_id`` reopened (status RUNNING again) if the store still has it, else a new
    run named after the study. Trials nest under it while it is RUNNING."""
    logging.getLogger("mlflow").setLevel(logging.WARNING)  # not its "creating tables" lines
    with store_lock(uri):
        client = mlflow.MlflowClient(uri)
        if run_id is not None:
            try:
                client.update_run(run_id, status="RUNNING")
                return run_id
            except mlflow.exceptions.MlflowException:  # another store, or the run was deleted
                pass
        experiment = client.get_experiment_by_name(experiment_name)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else client.create_experiment(experiment_name))
        tag_experiment(client, experiment_id)
        return client.create_run(experiment_id, run_name=experiment_name, tags=tags).info.run_id


def close_parent_run(uri: str, run_id: str, finished: bool) -> None:
    """FINISHED when every trial is done; otherwise KILLED, and the next run of the study reopens it."""
    mlflow.MlflowClient(uri).set_terminated(run_id, "FINISHED" if finished else "KILLED")
