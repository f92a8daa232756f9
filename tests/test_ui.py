"""What makes runs read well in MLflow's UI (names, tags, experiment tags, per-run artifacts), and the
one-line errors of ``fl-sparse ui``. The server and the browser are in test_ui_browser.py."""

from __future__ import annotations

import importlib.util
import json
import socket
import sys

import mlflow
import pytest
import torch

from fl_sparse.cli.main import main
from fl_sparse.core.state import ServerState
from fl_sparse.reporting import run_details
from fl_sparse.tracking import links as ui

needs_server = pytest.mark.skipif(importlib.util.find_spec("uvicorn") is None,
                                  reason="the server extra is not installed (pip install 'fl-sparse[server]')")
FAST = ["--rounds", "2", "--bind", "Experiment.local_epochs=1", "--bind", "Experiment.num_clients=10",
        "--bind", "Experiment.clients_per_round=2"]


def only_run(tmp_path):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fl_sparse")
    [run] = client.search_runs([experiment.experiment_id])
    return client, experiment, run


def test_a_run_is_named_tagged_and_leaves_plots_and_a_layer_table(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["run", "pffdst", "demo", *FAST, "--seed", "3", "--budget-gb", "7"]) == 0
    client, experiment, run = only_run(tmp_path)
    assert run.info.run_name == "pffdst demo s=0.8 seed=3"
    tags = run.data.tags
    assert {key: tags[key] for key in ("algorithm", "presets", "sparsity", "seed", "budget_gb", "device")} == \
        {"algorithm": "pffdst", "presets": "demo", "sparsity": "0.8", "seed": "3", "budget_gb": "7", "device": "cpu"}
    assert tags["fl_sparse_version"] and tags["host_cpu"]
    commit = run_details.git_commit()  # this checkout's commit; absent for an installed wheel
    assert tags.get("git_commit") == (commit[0] if commit else None)
    assert experiment.tags[ui.EXPERIMENT_KIND_TAG] == "custom_model_development"
    view = json.loads(experiment.tags[f"mlflow.sharedViewState.{ui.CHART_VIEW_KEY}"])
    assert view["globalLineChartConfig"]["selectedXAxisMetricKey"] == "cumulative_gb"
    assert {"cumulative_gb", "cumulative_flops"} <= set(run.data.metrics)

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.gin", "operative_config.gin", "layers.md", "plots"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {"plots/accuracy_vs_gb.png", "plots/accuracy_vs_flops.png"}
    client.download_artifacts(run.info.run_id, "", str(tmp_path / "got"))
    for plot in plots:
        assert (tmp_path / "got" / plot).read_bytes()[:4] == b"\x89PNG"
    table = (tmp_path / "got" / "layers.md").read_text()  # the final round's mask, as its metrics say
    assert f"| fc1.weight | 768,000 | yes | {run.data.metrics['density/fc1.weight']:.4f} |" in table, table
    assert "| conv1.bias | 6 | no | 1.0000 | 0.0000 |" in table and "| **total** | 782,006 |" in table
    assert "fl-sparse ui --tracking-uri sqlite:///" in capsys.readouterr().out


def test_without_matplotlib_the_run_skips_the_plots_with_one_warning(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now fails, find_spec says None
    assert importlib.util.find_spec("matplotlib") is None
    assert main(["run", "fedavg", *FAST]) == 0
    client, _, run = only_run(tmp_path)
    assert run.info.status == "FINISHED" and run.info.run_name == "fedavg s=0 seed=0"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "layers.md" in artifacts and "plots" not in artifacts
    warnings = [line for line in capsys.readouterr().err.splitlines() if "matplotlib" in line]
    assert warnings == ["fl-sparse: warning: matplotlib is not installed, so the run has no accuracy plots "
                        "(pip install 'fl-sparse[report]')"]


def test_layer_table_counts_density_and_frozen_per_tensor():
    weights = {"a.weight": torch.zeros(2, 5), "a.bias": torch.zeros(2), "steps": torch.zeros((), dtype=torch.long)}
    mask = {"a.weight": torch.tensor([[1, 1, 1, 1, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)}
    frozen = {"a.weight": torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)}
    lines = run_details.layer_table(ServerState(weights, mask, frozen, round=7)).splitlines()
    assert lines[0] == "Final global model after round 7."
    assert lines[4:] == ["| a.weight | 10 | yes | 0.4000 | 0.2000 | 0.5000 |",
                         "| a.bias | 2 | no | 1.0000 | 0.0000 | 0.0000 |",
                         "| **total** | 12 |  | 0.5000 | 0.1667 | 0.3333 |"]  # the integer tensor is left out


def test_ui_urls_open_the_training_view_and_the_gb_chart_view():
    assert ui.runs_url("http://h:1", "7") == "http://h:1/#/experiments/7/runs?workflowType=machine_learning"
    assert ui.runs_url("http://h:1", "7", charts=True).endswith(
        f"&compareRunsMode=CHART&viewStateShareKey={ui.CHART_VIEW_KEY}")
    assert ui.run_url("http://h:1", "7", "abc") == \
        "http://h:1/#/experiments/7/runs/abc/model-metrics?workflowType=machine_learning"


def test_ui_without_the_server_extra_is_one_line_naming_it(monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn"
                        else real_find_spec(name, *a))  # what mlflow-skinny leaves out
    assert main(["ui"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'fl-sparse[server]'" in err, err


@pytest.mark.parametrize("args, message", [
    (["--tracking-uri", "http://127.0.0.1:5000"], "is already a tracking server"),
    (["--tracking-uri", "sqlite:///nothing/here.db"], "no MLflow store at"),
])
@needs_server
def test_ui_bad_store_is_one_line(args, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["ui", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


@needs_server
def test_ui_busy_port_is_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments()
    with socket.socket() as busy:
        busy.bind((ui.HOST, 0))
        port = busy.getsockname()[1]
        assert main(["ui", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--port {port}" in err and "in use" in err, err
    assert main(["ui", "--port", "70000"]) == 2
    assert "--port 70000: give a TCP port from 1 to 65535" in capsys.readouterr().err
