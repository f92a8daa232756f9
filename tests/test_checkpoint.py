"""A run killed with SIGKILL and resumed ends bitwise identical to one that was never interrupted."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from safetensors.torch import load_file

from fl_sparse.cli.main import main

COMMAND = [sys.executable, "-m", "fl_sparse.cli", "run", "pffdst", "--rounds", "8",
           "--bind", "TwoStage.readjust_every=1", "--bind", "Experiment.local_epochs=1",
           "--bind", "Experiment.clients_per_round=3", "--bind", "Experiment.num_clients=10",
           "--bind", "Experiment.eval_every=2", "--bind", "UnionAverage.server_momentum=0.5",
           "--checkpoint-every", "1"]


def _final_metrics(db: Path) -> dict:
    client = mlflow.tracking.MlflowClient(f"sqlite:///{db}")
    [run] = client.search_runs([client.get_experiment_by_name("fl_sparse").experiment_id])
    assert run.info.status == "FINISHED"
    metrics = dict(run.data.metrics)
    metrics.pop("round_seconds")
    return metrics


# PruneFL keeps the squared gradients accumulated since its last reconfiguration (after round 5) as server state:
# a run cut after round 3 or 4 resumes with part of them.
PRUNEFL = [sys.executable, "-m", "fl_sparse.cli", "run", "prunefl", "--rounds", "8",
           "--bind", "PruneFL.reconfigure_every=5", "--bind", "PruneFLInitial.max_rounds=3",
           "--bind", "PruneFLInitial.samples=64", "--bind", "Experiment.local_epochs=1",
           "--bind", "Experiment.clients_per_round=3", "--bind", "Experiment.num_clients=10",
           "--bind", "Experiment.eval_every=2", "--checkpoint-every", "1"]


@pytest.mark.parametrize("command, state", [(COMMAND, ("frozen/", "server/")), (PRUNEFL, ("policy/",))],
                         ids=["pffdst", "prunefl"])
def test_killed_and_resumed_run_matches_an_uninterrupted_one(tmp_path, command, state):
    whole = subprocess.run([*command, "--checkpoint-dir", "whole", "--tracking-uri", "sqlite:///whole.db"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]

    args = [*command, "--checkpoint-dir", "cut", "--tracking-uri", "sqlite:///cut.db"]
    victim = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "cut" / "round-000003").exists() and time.time() < deadline:
        time.sleep(0.02)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert not (tmp_path / "cut" / "round-000008").exists(), "the run finished before it was killed"

    resumed = subprocess.run([*command, "--resume", "cut", "--tracking-uri", "sqlite:///cut.db"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming after round" in resumed.stderr

    a = load_file(str(tmp_path / "whole" / "round-000008" / "tensors.safetensors"))
    b = load_file(str(tmp_path / "cut" / "round-000008" / "tensors.safetensors"))
    assert a.keys() == b.keys() and all(any(k.startswith(prefix) for k in a) for prefix in state)
    assert all(torch.equal(a[k], b[k]) for k in a)
    meta_a = json.loads((tmp_path / "whole" / "round-000008" / "state.json").read_text())
    meta_b = json.loads((tmp_path / "cut" / "round-000008" / "state.json").read_text())
    assert meta_a["cumulative_bytes"] == meta_b["cumulative_bytes"]
    assert meta_a["codec_state"] == meta_b["codec_state"]
    assert _final_metrics(tmp_path / "whole.db") == _final_metrics(tmp_path / "cut.db")


@pytest.mark.parametrize("damage", ["truncate", "flip", "json"])
def test_damaged_checkpoint_is_refused_and_the_previous_one_kept(tmp_path, monkeypatch, capsys, damage):
    monkeypatch.chdir(tmp_path)
    args = ["run", "fedavgm", "--rounds", "3", "--no-tracking", "--bind", "Experiment.local_epochs=1",
            "--bind", "Experiment.clients_per_round=2", "--checkpoint-every", "1"]
    assert main([*args, "--checkpoint-dir", "ck"]) == 0
    newest = tmp_path / "ck" / "round-000003"
    tensors = newest / "tensors.safetensors"
    if damage == "truncate":
        tensors.write_bytes(tensors.read_bytes()[:1000])
    elif damage == "flip":
        data = bytearray(tensors.read_bytes())
        data[len(data) // 2] ^= 0x10
        tensors.write_bytes(bytes(data))
    else:
        (newest / "state.json").write_text("{not json")
    capsys.readouterr()
    assert main([*args, "--resume", "ck"]) == 2
    err = capsys.readouterr().err
    assert "round-000003" in err and err.count("\n") == 1
    assert (tmp_path / "ck" / "round-000002" / "state.json").is_file()


def test_resume_with_another_configuration_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["run", "fedavg", "--rounds", "2", "--no-tracking", "--bind", "Experiment.local_epochs=1",
            "--bind", "Experiment.clients_per_round=2", "--checkpoint-every", "1"]
    assert main([*args, "--checkpoint-dir", "ck"]) == 0
    assert main([*args, "--resume", "ck", "--seed", "5"]) == 2
    assert "different configuration" in capsys.readouterr().err
