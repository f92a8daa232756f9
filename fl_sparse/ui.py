"""``fl-sparse ui``: MLflow's own UI on a store of fl_sparse runs, opened on what a researcher compares.

Two things make MLflow 3.17's UI open on the training runs rather than on its GenAI pages:

* the experiment tag ``mlflow.experimentKind = custom_model_development``, which the UI reads to pick an
  experiment's view (fl_sparse sets it on every experiment it logs to). The 3.17.2 UI build reads it only
  while its "workflow type" switch is off, and ships with that switch on;
* the URL parameter ``workflowType=machine_learning``, which that switch does read (it otherwise defaults to
  "GenAI"). Every URL printed here carries it.

The chart URL opens the runs' accuracy charts against cumulative GB: MLflow's line charts can take any
metric as the x-axis, and a *shared view* (an experiment tag ``mlflow.sharedViewState.<key>`` holding the
charts' settings as JSON, opened with ``viewStateShareKey=<key>`` in the URL, as the UI's Share button does)
selects ``cumulative_gb`` for every line chart. The server is the ``server`` extra's full ``mlflow``;
nothing here is imported by the engine.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from fl_sparse.errors import FlSparseError

HOST = "127.0.0.1"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
CHART_VIEW_KEY = "fl_sparse_accuracy_vs_gb"
CHART_VIEW = {"globalLineChartConfig": {"xAxisKey": "metric", "selectedXAxisMetricKey": "cumulative_gb",
                                        "lineSmoothness": 0},
              "chartsSearchFilter": "accuracy"}
READY_TIMEOUT_S = 180  # the server imports all of MLflow and migrates the store; slow on a busy 2-core host
STOP_GRACE_S = 15


class UiError(FlSparseError):
    """The UI cannot be served: the extra is missing, the store or port is unusable, or the server failed."""


def experiment_tags() -> dict[str, str]:
    """The experiment tags that make the UI open an experiment as model training, with the chart view."""
    return {EXPERIMENT_KIND_TAG: MODEL_TRAINING, f"mlflow.sharedViewState.{CHART_VIEW_KEY}": json.dumps(CHART_VIEW)}


def tag_experiment(client, experiment_id: str) -> None:
    """Set :func:`experiment_tags` that the experiment lacks (a kind chosen in the UI is kept)."""
    present = client.get_experiment(experiment_id).tags
    for key, value in experiment_tags().items():
        if key not in present:
            client.set_experiment_tag(experiment_id, key, value)


def runs_url(base: str, experiment_id: str, charts: bool = False) -> str:
    """The experiment's runs list (``charts``: its accuracy charts against cumulative GB)."""
    query = "workflowType=machine_learning"
    if charts:
        query += f"&compareRunsMode=CHART&viewStateShareKey={CHART_VIEW_KEY}"
    return f"{base}/#/experiments/{experiment_id}/runs?{query}"


def run_url(base: str, experiment_id: str, run_id: str) -> str:
    """One run's page; its "Model metrics" tab charts every metric."""
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics?workflowType=machine_learning"


def require_server() -> None:
    """Raise one line naming the ``server`` extra unless the full mlflow (server and UI bundle) is installed."""
    spec = importlib.util.find_spec("mlflow")
    bundle = Path(spec.origin).parent / "server" / "js" / "build" / "index.html" if spec and spec.origin else None
    if bundle is None or not bundle.is_file() or importlib.util.find_spec("uvicorn") is None:
        raise UiError("fl-sparse ui needs MLflow's server and UI, which mlflow-skinny lacks: "
                      "pip install 'fl-sparse[server]'")


def check_port_free(port: int) -> None:
    if not 1 <= port <= 65535:
        raise UiError(f"--port {port}: give a TCP port from 1 to 65535")
    with socket.socket() as probe:
        try:
            probe.bind((HOST, port))
        except OSError:
            raise UiError(f"--port {port}: {HOST}:{port} is in use; pass another --port") from None


def start_server(uri: str, port: int, log=None, artifacts_destination: Path | None = None) -> subprocess.Popen:
    """``mlflow server`` on ``HOST:port`` for the store ``uri``, in a new process group (its leader's pid is
    the group id: :func:`stop_server` ends all of it). One worker, no access log, and no job runner (its
    seven huey consumers run MLflow's GenAI evaluation jobs, which training runs do not use)."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", HOST,
               "--port", str(port), "--workers", "1", "--uvicorn-opts", "--no-access-log"]
    if artifacts_destination is not None:  # where runs logged through this server put their artifacts
        command += ["--artifacts-destination", str(artifacts_destination)]
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    # Its messages go to stderr (or ``log``): stdout carries only the URLs printed by :func:`serve`.
    return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log or 2, stderr=log,
                            start_new_session=True)


def wait_until_ready(server: subprocess.Popen, port: int, timeout_s: float = READY_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise UiError(f"the MLflow server exited with code {server.returncode} before it answered; "
                          "its messages above say why")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=5) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise UiError(f"the MLflow server did not answer on {HOST}:{port} within {timeout_s:.0f} s")


def stop_server(server: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to the server's process group, SIGKILL to what is left after ``grace_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            break
        try:
            server.wait(grace_s)
            break
        except subprocess.TimeoutExpired:
            continue
    server.wait()


def _local_store(uri: str) -> str:
    """The store ``uri`` if ``mlflow server`` can serve it, else one line saying what to pass instead."""
    from fl_sparse.tracking import sqlite_file

    if uri.startswith(("http:", "https:")):
        raise UiError(f"--tracking-uri {uri} is already a tracking server: open it in a browser "
                      "(fl-sparse ui serves a local store such as sqlite:///mlflow.db)")
    database = sqlite_file(uri)
    if database is not None and not database.is_file():
        raise UiError(f"no MLflow store at {database}: log a run first (fl-sparse run ...) or pass "
                      "--tracking-uri sqlite:///PATH/mlflow.db")
    return uri


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def serve(uri: str, port: int, experiment_name: str) -> int:
    """Serve until Ctrl-C (or SIGTERM / SIGHUP), then stop the server's process group and return 0."""
    require_server()
    _local_store(uri)
    check_port_free(port)
    from mlflow import MlflowClient, __version__

    from fl_sparse.tracking import store_lock

    with store_lock(uri):  # opening an older store migrates it
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is not None:  # experiments logged before fl_sparse set the tags get them now
            tag_experiment(client, experiment.experiment_id)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, _interrupt)
    server = start_server(uri, port)
    base = f"http://{HOST}:{port}"
    try:
        wait_until_ready(server, port)
        print(f"MLflow {__version__} UI for {uri} (server pid {server.pid}); Ctrl-C stops it", flush=True)
        if experiment is None:
            print(f"  no experiment {experiment_name!r} in this store yet: {base}/#/experiments", flush=True)
        else:
            print(f"  runs of {experiment_name!r}: {runs_url(base, experiment.experiment_id)}\n"
                  f"  accuracy vs cumulative GB: {runs_url(base, experiment.experiment_id, charts=True)}",
                  flush=True)
        server.wait()
        raise UiError(f"the MLflow server stopped by itself (exit code {server.returncode})")
    except KeyboardInterrupt:
        print("stopping the MLflow server", file=sys.stderr, flush=True)
        return 0
    finally:
        stop_server(server)
