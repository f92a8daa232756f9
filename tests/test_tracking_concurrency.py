"""Many runs against one MLflow sqlite store, and a store that fails: every run finishes with all its metrics
and params, or stops with one line on stderr and checkpoints that ``--resume`` continues."""

import sqlite3
import subprocess
import sys

import mlflow
from mlflow.exceptions import MlflowException

from fl_sparse.cli.main import main
from fl_sparse.tracking import tracker as tracking

# The smallest run that still trains, evaluates and logs every metric in each of its rounds.
TINY = ["--bind", "Experiment.local_epochs=1", "--bind", "Experiment.num_clients=4",
        "--bind", "Experiment.clients_per_round=1", "--bind", "Experiment.batch_size=64"]
ROUND_METRICS = ["test_accuracy", "local_accuracy", "train_loss", "uplink_bytes", "cumulative_gb"]


def test_four_runs_started_at_once_on_a_fresh_store_all_log_everything(tmp_path):
    """Four seeds launched together, as people launch them: without the lock beside the database, MLflow's
    schema migration ran in all four and left the store half-migrated (`_alembic_tmp_latest_metrics`)."""
    uri = f"sqlite:///{tmp_path / 'runs.db'}"
    runs = [subprocess.Popen([sys.executable, "-m", "fl_sparse.cli", "run", "fedavg", "--rounds", "2",
                              "--seed", str(seed), "--tracking-uri", uri, "--threads", "1", *TINY],
                             cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for seed in range(4)]
    outputs = [run.communicate(timeout=900) for run in runs]
    for run, (_, err) in zip(runs, outputs):
        assert run.returncode == 0 and "Traceback" not in err, err[-3000:]
    client = mlflow.tracking.MlflowClient(uri)
    logged = client.search_runs([client.get_experiment_by_name("fl_sparse").experiment_id])
    assert sorted(run.data.params["Experiment.seed"] for run in logged) == ["0", "1", "2", "3"]
    for run in logged:
        assert run.info.status == "FINISHED"
        assert run.data.params["Experiment.num_clients"] == "4" and run.data.params["macros/ROUNDS"] == "2"
        assert run.data.tags["algorithm"] == "fedavg"
        for metric in ROUND_METRICS:
            assert [m.step for m in client.get_metric_history(run.info.run_id, metric)] == [1, 2], metric
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.gin", "operative_config.gin"}


def test_a_store_failing_mid_run_stops_with_one_line_and_resume_continues(tmp_path, monkeypatch, capsys):
    """Round 1 meets a locked database twice (retried, logged); from round 2 on the store stays locked: the
    run stops with one line naming the checkpoints, and --resume finishes the same MLflow run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(tracking, "LOCKED_BACKOFF_S", 0.0)
    log_metrics, attempts = mlflow.log_metrics, []

    def locked_store(metrics, step):
        attempts.append(step)
        if step >= 2 or attempts.count(step) <= 2:
            raise MlflowException("(sqlite3.OperationalError) database is locked", error_code="TEMPORARILY_UNAVAILABLE")
        return log_metrics(metrics, step=step)

    args = ["run", "fedavg", "--rounds", "3", "--tracking-uri", "sqlite:///runs.db", "--checkpoint-every", "1",
            "--checkpoint-dir", "ck", *TINY]
    monkeypatch.setattr(mlflow, "log_metrics", locked_store)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [line for line in err.splitlines() if "error" in line]
    assert line == err.rstrip("\n").splitlines()[-1]
    assert line.startswith("fl-sparse: error: MLflow tracking at sqlite:///") and "failed to log round 2" in line
    assert "database is locked" in line and "--resume ck" in line, line
    assert attempts == [1, 1, 1] + [2] * (tracking.LOCKED_RETRIES + 1)
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["round-000001"]

    monkeypatch.setattr(mlflow, "log_metrics", log_metrics)
    assert main(["run", "fedavg", "--rounds", "3", "--tracking-uri", "sqlite:///runs.db", "--resume", "ck", *TINY]) == 0
    assert "resuming after round 1" in capsys.readouterr().err
    client = mlflow.tracking.MlflowClient(f"sqlite:///{tmp_path / 'runs.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("fl_sparse").experiment_id])
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "cumulative_gb")] == [1, 2, 3]


def test_a_store_of_an_older_schema_is_one_line_without_traceback(tmp_path):
    """A real store failure, through the console script: a store left at an old schema revision (as an older
    MLflow, or a migration that died, leaves it) is refused by MLflow; MLflow's own error logging must not
    leak a traceback, and the store is left as it was."""
    database = tmp_path / "old.db"
    mlflow.tracking.MlflowClient(f"sqlite:///{database}")  # a complete store ...
    with sqlite3.connect(database) as connection:  # ... that claims MLflow's first schema revision
        connection.execute("UPDATE alembic_version SET version_num = '451aebb31d03'")
    content = database.read_bytes()
    done = subprocess.run([sys.executable, "-m", "fl_sparse.cli", "run", "fedavg", "--rounds", "1",
                           "--tracking-uri", "sqlite:///old.db", "--threads", "1", *TINY],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    [line] = [line for line in done.stderr.splitlines() if "error" in line.lower()]
    assert line.startswith("fl-sparse: error: MLflow tracking at sqlite:///") and "failed to open the store" in line
    assert "out-of-date database schema" in line, line
    assert database.read_bytes() == content
