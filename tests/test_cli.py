"""The command line as a user meets it: listing, a short run, and one-line errors with exit code 2."""

import os
import subprocess
import sys

import mlflow
import pytest

from fl_sparse.cli.main import main

FAST = ["--bind", "Experiment.local_epochs=1", "--bind", "Experiment.num_clients=10",
        "--bind", "Experiment.clients_per_round=2"]


def test_list_shows_the_five_interfaces(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for interface in ["Aggregator:", "MaskPolicy:", "FreezePolicy:", "CommCodec:", "LocalObjective:"]:
        assert interface in out
    assert "ServerReadjust(" in out and "Proximal(mu=1.0, reference_softmax=False)" in out
    assert "pffdst" in out and "cifar10_lenet" in out


def test_fedavg_two_rounds_from_an_empty_directory_logs_to_mlflow(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["run", "fedavg", "--rounds", "2", *FAST]) == 0
    captured = capsys.readouterr()
    assert "embedded CIFAR-10 subset" in captured.err
    assert f"fl-sparse ui --tracking-uri sqlite:///{tmp_path / 'mlflow.db'}" in captured.out
    assert (tmp_path / "mlflow.db").is_file()
    client = mlflow.tracking.MlflowClient("sqlite:///" + str(tmp_path / "mlflow.db"))
    [run] = client.search_runs([client.get_experiment_by_name("fl_sparse").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["Experiment.num_clients"] == "10"
    for metric in ["test_accuracy", "local_accuracy", "train_loss", "uplink_bytes", "downlink_bytes",
                   "cumulative_gb", "flops"]:
        assert metric in run.data.metrics, metric
    history = client.get_metric_history(run.info.run_id, "cumulative_gb")
    assert [m.step for m in history] == [1, 2]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.gin", "operative_config.gin"} <= artifacts


def test_tracking_uri_flag_and_no_tracking(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = "sqlite:///" + str(tmp_path / "elsewhere.db")
    assert main(["run", "fedavg", "--rounds", "1", "--tracking-uri", uri, *FAST]) == 0
    assert (tmp_path / "elsewhere.db").is_file() and not (tmp_path / "mlflow.db").exists()
    assert main(["run", "fedavg", "--rounds", "1", "--no-tracking", *FAST]) == 0
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.parametrize("args, message", [
    (["run", "nosuchalgo"], "unknown algorithm 'nosuchalgo'"),
    (["run", "fedavg", "nosuchpreset"], "unknown preset 'nosuchpreset'"),
    (["run", "fedavg", "--bind", "SGD.lrr=0.1"], "'SGD' doesn't have a parameter named 'lrr'"),
    (["run", "fedavg", "--bind", "Nope.x=1"], "No configurable matching 'Nope'"),
    (["run", "pffdst", "--sparsity", "1.5"], "sparsity 1.5 is outside [0, 1)"),
    (["run", "pffdst", "--bind", "TwoStage.differential=0.5"], "TwoStage.differential=0.5 exceeds 1 - s"),
    (["run", "pffdst", "--bind", "TwoStage.stage1_sparsity=0.5"], "TwoStage.stage1_sparsity=0.5 must be > s2"),
    (["run", "pffdst", "--bind", "TwoStage.readjust_every=0"], "TwoStage.readjust_every=0 must be >= 1"),
    (["run", "pffdst", "--rounds", "20", "--bind", "TwoStage.readjust_until=50"], "readjust_until=50"),
    (["run", "fedavg", "--bind", "Experiment.dirichlet_alpha=0"], "dirichlet_alpha=0 must be > 0"),
    (["run", "fedavg", "--bind", "Experiment.clients_per_round=50"], "clients_per_round=50"),
    (["run", "fedavg", "--rounds", "-3"], "--rounds -3"),
    (["run", "fedavg", "--data-dir", "/no/such/dir"], "--data-dir /no/such/dir"),
])
def test_bad_input_is_one_line_and_exit_2_and_writes_nothing(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert os.listdir(tmp_path) == []


def test_malformed_data_directory_names_the_missing_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    assert main(["run", "fedavg", "--data-dir", "data"]) == 2
    err = capsys.readouterr().err
    assert "cifar-10-batches-py" in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == ["data"]


def test_console_script_exits_2_on_unknown_algorithm(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fl_sparse.cli", "run", "nosuchalgo"], cwd=tmp_path,
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]
    assert "nosuchalgo" in done.stderr


def test_report_writes_a_table_and_two_plots_from_mlflow_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for algorithm, seed in [("fedavg", "0"), ("fedavg", "1"), ("pffdst", "0")]:
        assert main(["run", algorithm, "--rounds", "2", "--seed", seed, *FAST]) == 0
    assert main(["report", "out"]) == 0
    table = (tmp_path / "out" / "table.md").read_text()
    assert "| FedAvg | - | 2 |" in table and "| PFFDST | - | 1 |" in table, table
    assert "best" in table and "local acc." in table and "test acc." in table
    for plot in ["accuracy_vs_gb.png", "accuracy_vs_flops.png"]:
        assert (tmp_path / "out" / plot).read_bytes()[:4] == b"\x89PNG"
    assert main(["report", "out", "--experiment-name", "nothing"]) == 2
