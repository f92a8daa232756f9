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
from typing import Callable

from fl_sparse.core.errors import FlSparseError
from fl_sparse.tracking.links import HOST, runs_url, tag_experiment
from fl_sparse.tracking.store import sqlite_file, store_lock

READY_TIMEOUT_S = 180  # the server imports all of MLflow and migrates the store; slow on a busy 2-core host
STOP_GRACE_S = 15


class UiError(FlSparseError):
    """The UI cannot be served: the extra is missing, the store or port is unusable, or the server failed."""


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


def serve(uri: str, port: int, experiment_name: str, say: Callable[..., None]) -> int:
    """Serve until Ctrl-C (or SIGTERM / SIGHUP), then stop the server's process group and return 0. ``say(line)``
    shows the URLs to open (the command line prints them); ``say(line, err=True)`` a note about stopping."""
    require_server()
    _local_store(uri)
    check_port_free(port)
    from mlflow import MlflowClient, __version__

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
        say(f"MLflow {__version__} UI for {uri} (server pid {server.pid}); Ctrl-C stops it")
        if experiment is None:
            say(f"  no experiment {experiment_name!r} in this store yet: {base}/#/experiments")
        else:
            say(f"  runs of {experiment_name!r}: {runs_url(base, experiment.experiment_id)}\n"
                f"  accuracy vs cumulative GB: {runs_url(base, experiment.experiment_id, charts=True)}")
        server.wait()
        raise UiError(f"the MLflow server stopped by itself (exit code {server.returncode})")
    except KeyboardInterrupt:
        say("stopping the MLflow server", err=True)
        return 0
    finally:
        stop_server(server)
