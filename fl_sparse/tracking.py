"""Run callbacks: MLflow tracking and the terminal progress bar."""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from fl_sparse.errors import FlSparseError

if TYPE_CHECKING:  # the engine imports torch; the command line checks --tracking-uri before that
    from fl_sparse.engine import RoundEvent

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# Attempts at one MLflow call that failed on a locked sqlite database. Each attempt already waits up to
# 20 s inside sqlite (MLflow sets PRAGMA busy_timeout = 20000 on every session); the retries cover runs
# that hold the database longer than that, e.g. several runs committing their params at once.
LOCKED_RETRIES = 4
LOCKED_BACKOFF_S = 0.5


class TrackingError(FlSparseError):
    """The MLflow store could not be created, opened or written. Checkpoints are written only after a
    round is logged, so the run's checkpoints stay consistent and ``--resume`` continues it."""


def tracking_uri(cli_value: str | None) -> str:
    """--tracking-uri wins, then MLFLOW_TRACKING_URI, then a sqlite file in the working directory.

    A relative sqlite path is made absolute: MLflow caches stores by URI, so a relative one would keep
    pointing at the first working directory it was used from."""
    uri = cli_value or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URI (None for other stores and in-memory sqlite)."""
    prefix = "sqlite:///"
    path = uri[len(prefix):].split("?")[0] if uri.startswith(prefix) else ""
    return Path(path) if path and path != ":memory:" else None


def check_tracking_uri(cli_value: str | None) -> None:
    """Reject a local store that cannot be created before anything is built: a database path that is a
    directory, or a path below a file or an unwritable directory (MLflow creates missing directories).
    Remote stores are MLflow's to check."""
    uri = tracking_uri(cli_value)
    source = "--tracking-uri" if cli_value else ("MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI")
                                                 else "the default tracking URI")
    database = sqlite_file(uri)
    if database is not None:
        if database.is_dir():
            raise TrackingError(f"{source} {uri}: {database} is a directory; give the path of a database file")
        folder = database.parent
    elif "://" not in uri or uri.startswith("file:"):  # MLflow's file store: a directory
        folder = Path(uri.removeprefix("file://").removeprefix("file:")).resolve()
    else:
        return
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise TrackingError(f"{source} {uri}: {existing} is a file, not a directory; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TrackingError(f"{source} {uri}: the directory {existing} is not writable; choose another path")


@contextlib.contextmanager
def store_lock(uri: str):
    """Hold ``<database>.lock`` while MLflow creates, migrates or first opens a sqlite store: MLflow's schema
    migration is not safe against other processes (four runs started together leave the store
    half-migrated). The lock is released when the file is closed, also when the process dies."""
    database = sqlite_file(uri)
    if database is None:
        yield
        return
    import fcntl

    lock = Path(f"{database}.lock")
    try:
        database.parent.mkdir(parents=True, exist_ok=True)  # as MLflow would, but the lock comes first
        handle = open(lock, "a")
    except OSError as error:
        raise TrackingError(f"cannot create {lock} beside the MLflow store: {error.strerror}; "
                            "make its directory writable or choose another --tracking-uri") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:  # e.g. a network file system without locks
            raise TrackingError(f"cannot lock {lock}: {error.strerror}; put the sqlite store on a local "
                                "disk or use a tracking server") from None
        yield


class MlflowTracker:
    """Logs one run: every gin binding as a param, the operative config as an artifact, and the
    per-round metrics. Evaluation metrics are logged only in the rounds where they were computed.
    Any failure of the store is raised as one :class:`TrackingError`."""

    def __init__(self, uri: str, experiment_name: str, run_name: str, resume_run_id: str | None = None):
        import logging

        import mlflow

        logging.getLogger("mlflow").setLevel(logging.WARNING)  # keep the terminal to the progress bar
        # MLflow logs every sqlite OperationalError ("database is locked") with a traceback before raising
        # it; the retry below handles it, and a lasting failure is reported as one TrackingError line.
        logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
        self.mlflow, self.uri = mlflow, uri
        with store_lock(uri):  # creating the client creates (and migrates) the store
            self.client = self._call("open the store", mlflow.MlflowClient, uri)
            mlflow.set_tracking_uri(uri)
            if resume_run_id:  # continue the interrupted run; rounds after its checkpoint are logged again
                self.run = self._call("reopen the run", mlflow.start_run, run_id=resume_run_id)
            else:
                experiment = self._call("set the experiment", mlflow.set_experiment, experiment_name)
                from fl_sparse.ui import tag_experiment  # the UI opens it as model training, with a GB chart view

                self._call("tag the experiment", tag_experiment, self.client, experiment.experiment_id)
                self.run = self._call("start the run", mlflow.start_run, run_name=run_name)
        self.run_id = self.run.info.run_id
        self.last_state = None  # the final global model's mask and frozen set go into layers.md

    def _call(self, what: str, function, *args, retries: int = LOCKED_RETRIES, **kwargs):
        """``function(*args, **kwargs)``, retried while sqlite reports the database locked."""
        for attempt in range(retries + 1):
            try:
                return function(*args, **kwargs)
            except Exception as error:  # noqa: BLE001  (the store's failures come in many types)
                if "database is locked" in str(error) and attempt < retries:
                    time.sleep(LOCKED_BACKOFF_S * 2**attempt)
                    continue
                from fl_sparse.configs import first_line

                raise TrackingError(f"MLflow tracking at {self.uri} failed to {what}: "
                                    f"{type(error).__name__}: {first_line(error)}") from None

    def log_config(self, params: dict[str, str], config_text: str, tags: dict[str, str]) -> None:
        items = list(params.items())
        for start in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self._call("log params", self.mlflow.log_params, dict(items[start:start + 100]))
        self._call("log the config", self.mlflow.log_text, config_text, "config.gin")
        self._call("set tags", self.mlflow.set_tags, tags)

    def __call__(self, event: RoundEvent) -> None:
        finite = {key: value for key, value in event.metrics.items() if math.isfinite(value)}
        self._call(f"log round {event.round}", self.mlflow.log_metrics, finite, step=event.round)
        self.last_state = event.state

    def finish(self, operative_config: str, status: str = "FINISHED") -> None:
        self._call("log the operative config", self.mlflow.log_text, operative_config, "operative_config.gin")
        self._call("log the summary artifacts", self._log_summary)
        self._call("end the run", self._end_run, status)

    def _log_summary(self) -> None:
        """layers.md (final per-layer density and frozen fraction) and the accuracy plots, drawn from the
        run's whole logged history (a resumed run included)."""
        import tempfile

        from fl_sparse import run_details

        if self.last_state is not None:
            self.mlflow.log_text(run_details.layer_table(self.last_state), "layers.md")
        history = {key: [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]
                   for key in run_details.PLOT_METRICS}
        tags = self.client.get_run(self.run_id).data.tags
        with tempfile.TemporaryDirectory() as folder:
            plots = run_details.accuracy_plots(history, tags.get("algorithm", "?"),
                                               [p for p in tags.get("presets", "").split(",") if p], Path(folder))
            for plot in plots:
                self.mlflow.log_artifact(str(plot), "plots")

    def _end_run(self, status: str) -> None:
        # mlflow.end_run forgets the active run before it writes the status, so a retry writes it directly.
        if self.mlflow.active_run() is not None:
            self.mlflow.end_run(status=status)
        else:
            self.client.set_terminated(self.run_id, status)

    def abandon(self, operative_config: str) -> None:
        """Mark the run FAILED if the store still answers (the failure may be the store's own), without
        retries; the active run is forgotten either way, so this process can start another."""
        for what, function, args in [("log the operative config", self.mlflow.log_text,
                                      (operative_config, "operative_config.gin")),
                                     ("end the run", self._end_run, ("FAILED",))]:
            with contextlib.suppress(TrackingError):
                self._call(what, function, *args, retries=0)

    def how_to_open(self, uri: str) -> str:
        from fl_sparse.ui import HOST, run_url

        url = run_url(f"http://{HOST}:5000", self.run.info.experiment_id, self.run_id)
        if uri.startswith(("http:", "https:")):  # the store is a server with its own UI
            return f"MLflow run {self.run_id}: {run_url(uri.rstrip('/'), self.run.info.experiment_id, self.run_id)}"
        store = uri if uri.startswith(("sqlite:", "postgresql:", "mysql:")) else Path(uri).as_uri()
        return (f"MLflow run {self.run_id}\n  open it: fl-sparse ui --tracking-uri {store}  "
                f"(pip install 'fl-sparse[server]'), then {url}")


class ProgressBar:
    """A tqdm bar showing round, last evaluated accuracy and cumulative GB."""

    def __init__(self, total_rounds: int, start_round: int = 0):
        from tqdm import tqdm

        self.bar = tqdm(total=total_rounds, initial=start_round, unit="round", dynamic_ncols=True)
        self.accuracy = float("nan")

    def __call__(self, event: RoundEvent) -> None:
        if event.evaluated:
            self.accuracy = event.metrics["test_accuracy"]
        self.bar.set_postfix(acc=f"{self.accuracy:.3f}", GB=f"{event.metrics['cumulative_gb']:.4f}",
                             density=f"{event.metrics['density']:.3f}")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
