"""Flower deployment (fl_sparse.flower): the same composition through Flower's Message API.

The first tests pass messages through a loopback ``Grid`` that calls the ClientApp in this process (fast,
every branch of the server's checks). ``test_loopback_deployment`` runs the real thing: a SuperLink and
three SuperNodes as separate processes on 127.0.0.1, driven by ``flwr run``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr", reason="the flower extra is not installed: pip install 'fl-sparse[flower]'")

from flower_helpers import (  # noqa: E402
    FAULTY_APP,
    PFFDST_SHORT,
    LoopbackGrid,
    assert_same_weights,
    flower_run,
    in_process_run,
    read_results,
    run_config,
)
from flwr.app import Context, RecordDict  # noqa: E402

from fl_sparse.core.errors import ConfigError  # noqa: E402
from fl_sparse.flower import serverapp, setup  # noqa: E402


def test_run_config_keys_match_the_app():
    import tomllib

    from fl_sparse.flower import APP_DIR

    for app in (APP_DIR, FAULTY_APP):  # flwr refuses a -c key that the app does not declare
        declared = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
        assert declared == setup.DEFAULTS, app


def test_without_flower_the_command_says_which_extra_to_install(monkeypatch, capsys):
    from fl_sparse.cli.main import main

    monkeypatch.setitem(sys.modules, "flwr", None)  # as if flwr were not installed
    assert main(["flower", "run", "pffdst", "--superlink", "lab"]) == 2
    assert capsys.readouterr().err.strip() == ("fl-sparse: error: Flower is not installed: "
                                               "pip install 'fl-sparse[flower]'")


def test_cli_submits_the_composition_with_flwr_run(monkeypatch, capsys):
    from fl_sparse.cli.main import main
    from fl_sparse.flower import APP_DIR

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda command, env: calls.append((command, env)) or
                        subprocess.CompletedProcess(command, 0))
    assert main(["flower", "run", "pffdst", "demo", "--superlink", "lab", "--rounds", "4", "--set", "threads=1"]) == 0
    command, env = calls[0]
    assert command[1:4] == ["run", str(APP_DIR), "lab"] and "--stream" not in command
    config = dict(arg.split("=", 1) for arg in command[5::2])
    assert config["algorithm"] == '"pffdst"' and config["presets"] == '"demo"' and config["threads"] == "1"
    assert "ROUNDS = 4\\nPFFDST_ROUNDS = 4" in config["bindings"] and "progress" not in config
    assert main(["flower", "run", "pffdst", "--superlink", "lab", "--stream"]) == 0
    assert calls[1][0][-1] == "--stream" and "progress=true" in calls[1][0]  # the stream shows the progress bar
    # a bad composition fails here, in one line, before anything is submitted
    assert main(["flower", "run", "pffdst", "--superlink", "lab", "--bind", "Experiment.rounds = 0"]) == 2
    assert main(["flower", "run", "pffdst", "--superlink", "lab", "--set", "colour=1"]) == 2
    assert len(calls) == 2
    assert capsys.readouterr().err.count("fl-sparse: error:") == 2


class FakeFlower:
    """Stands in for fl_sparse.flower.local.LocalFlower: records the flwr commands, and plays a run that ends
    with ``status`` (writing the server's summary file when it completes)."""

    status = "finished:completed"

    def __init__(self, env):
        self.env, self.commands = env, []
        FakeFlower.last = self

    def __enter__(self):
        import tempfile

        self.folder = tempfile.TemporaryDirectory()
        return self

    def __exit__(self, *exc):
        self.folder.cleanup()

    def flwr(self, *args):
        self.commands.append(args)
        config = dict(arg.split("=", 1) for arg in args[4:args.index("--stream"):2])
        if self.status == "finished:completed":
            Path(json.loads(config["summary-file"])).write_text("finished 4 of 4 rounds: the summary\n")

    def last_run(self):
        return {"status": self.status, "status-details": "ServerApp raised ConfigError: something"}


def test_simulate_runs_on_its_own_superlink_with_the_actors_it_is_given(monkeypatch, capsys):
    from fl_sparse.cli.main import main
    from fl_sparse.flower import APP_DIR, local

    monkeypatch.setattr(local, "LocalFlower", FakeFlower)
    assert main(["flower", "simulate", "pffdst", "demo", "--rounds", "4", "--workers", "2", "--threads", "3",
                 "--no-tracking"]) == 0
    assert capsys.readouterr().out == "finished 4 of 4 rounds: the summary\n"
    (args,) = FakeFlower.last.commands
    assert args[:3] == ("run", str(APP_DIR), local.CONNECTION) and "--stream" in args
    assert args[-2:] == ("--federation-config", "num-supernodes=20 client-resources-num-cpus=3 "
                                                "init-args-num-cpus=6 init-args-log-to-driver=false")
    config = dict(arg.split("=", 1) for arg in args[4:args.index("--stream"):2])
    assert (config["threads"], config["progress"], config["presets"]) == ("3", "true", '"demo"')
    assert "tracking-uri" not in config and FakeFlower.last.env == {"MLFLOW_TRACKING_URI": ""}
    # a failed run exits non-zero with Flower's reason in one line; --threads is a flag, not a --set key
    monkeypatch.setattr(FakeFlower, "status", "finished:failed")
    assert main(["flower", "simulate", "pffdst", "demo", "--no-tracking"]) == 2
    assert main(["flower", "simulate", "pffdst", "demo", "--set", "threads=2"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == ("fl-sparse: error: the Flower run ended finished:failed: ServerApp raised ConfigError: "
                      "something")
    assert err[1].startswith("fl-sparse: error: --set threads=2: give KEY=VALUE with KEY one of") and len(err) == 2


def test_loopback_grid_matches_the_in_process_engine_bitwise(task_identity, tmp_path):
    """PFFDST with 1-round stages: round 2 is the first of stage 2, so it carries the frozen part."""
    torch.set_num_threads(1)
    config = run_config(*PFFDST_SHORT)
    expected, expected_metrics = in_process_run(config)
    state, metrics = flower_run(config, num_nodes=3, out=tmp_path)
    assert state.freeze_version == expected.freeze_version == 1
    assert_same_weights(state.weights, expected.weights)
    assert_same_weights(state.mask, expected.mask)
    assert state.cumulative_bytes == expected.cumulative_bytes
    for ours, theirs in zip(metrics, expected_metrics):
        assert (ours["uplink_bytes"], ours["downlink_bytes"]) == (theirs["uplink_bytes"], theirs["downlink_bytes"])
        # Flower moves our bytes plus record names and the round's numbers
        assert 0 < ours["flower_downlink_bytes"] - ours["downlink_bytes"] < 500
        assert 0 < ours["flower_uplink_bytes"] - ours["uplink_bytes"] < 500
        assert ours["rejected_clients"] == 0


def test_a_resumed_flower_server_ends_bitwise_where_an_uninterrupted_one_does(task_identity, tmp_path):
    """The server stops after round 1 (its round-2 checkpoint removed, as if killed) and resumes with
    resume = true: same final weights, mask, frozen set and bytes as the run that was never stopped."""
    import shutil

    torch.set_num_threads(1)
    config = run_config(*PFFDST_SHORT)
    expected, _ = flower_run(config, num_nodes=3, out=tmp_path / "whole")
    shutil.copytree(tmp_path / "whole" / "checkpoints", tmp_path / "resumed" / "checkpoints")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "round-000002")
    state, metrics = flower_run({**config, "resume": True}, num_nodes=3, out=tmp_path / "resumed")
    assert [m["round"] for m in metrics] == [2]
    assert (state.round, state.freeze_version, state.cumulative_bytes) == (
        expected.round, expected.freeze_version, expected.cumulative_bytes)
    for name in ("weights", "mask", "frozen"):
        assert_same_weights(getattr(state, name), getattr(expected, name))


def test_the_flower_server_logs_to_mlflow_and_a_resume_continues_the_same_run(task_identity, tmp_path):
    """The ServerApp runs the same run path as fl-sparse run, with its tracker: one MLflow run whose rounds
    are all logged, and a server resumed from a checkpoint logs into that run, not a new one."""
    import shutil

    import mlflow

    torch.set_num_threads(1)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = {**run_config(*PFFDST_SHORT), "tracking-uri": store, "experiment-name": "flower_runs"}
    flower_run(config, num_nodes=3, out=tmp_path / "whole")
    client = mlflow.MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("flower_runs").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["algorithm"] == "pffdst"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "cumulative_gb")] == [1, 2]
    assert "flower_uplink_bytes" in run.data.metrics
    shutil.copytree(tmp_path / "whole" / "checkpoints", tmp_path / "resumed" / "checkpoints")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "round-000002")
    flower_run({**config, "resume": True}, num_nodes=3, out=tmp_path / "resumed")
    (again,) = client.search_runs([client.get_experiment_by_name("flower_runs").experiment_id])
    assert again.info.run_id == run.info.run_id and again.info.status == "FINISHED"
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the tracker exports it; later tests choose their own


def test_resume_without_a_checkpoint_dir_is_one_line(task_identity):
    with pytest.raises(ConfigError, match="resume = true needs checkpoint-dir"):
        serverapp.main(LoopbackGrid(run_config(*PFFDST_SHORT), 3, None),
                       Context(1, 0, {}, RecordDict(), run_config(*PFFDST_SHORT, resume=True)))


def test_hostile_replies_are_rejected_and_the_round_aggregates_the_others(task_identity, tmp_path):
    torch.set_num_threads(1)
    bindings = (*PFFDST_SHORT[:1], "Experiment.num_clients = 5", "Experiment.clients_per_round = 5",
                *PFFDST_SHORT[3:])
    config = run_config(*bindings, **{"round-timeout": 1.0})  # the silent client is given up on after 1 s
    faults = {("1", 0): "corrupt", ("1", 1): "oversized", ("1", 2): "wrong-schema", ("1", 3): "raise",
              ("2", 0): "wrong-round", ("2", 1): "extra-record", ("2", 2): "inflated-samples", ("2", 3): "silent"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        state, metrics = flower_run(config, num_nodes=5, faults=faults, out=tmp_path)
    rejected = [str(w.message) for w in caught if "rejected" in str(w.message)]
    assert len(rejected) == 8, "\n".join(rejected)
    for text in ("exceeds the", "expected round 2", "ClientApp failed", "no reply", "partition holds",
                 "records"):
        assert any(text in line for line in rejected), (text, rejected)
    assert [m["rejected_clients"] for m in metrics] == [4, 4]
    # Flower carried the 64 MiB reply; our count holds only payloads the codec was allowed to read
    assert metrics[0]["flower_uplink_bytes"] > 64 * 2**20 > 10 * metrics[0]["uplink_bytes"]

    # The same rounds in process, with the same clients' updates rejected: the same model, bit for bit
    expected, _ = in_process_run(config, damage={key for key in faults})
    assert_same_weights(state.weights, expected.weights)


# --- the real deployment: 1 SuperLink + 3 SuperNodes as processes on 127.0.0.1 -----------------------------

RUN_TIMEOUT = 900  # s; a run takes well under a minute on an idle 2-core machine, far longer on a loaded one
# SuperNode 1 and 2 damage their replies in the faulty run (fault-plan: round=fault); the honest app ignores it.
FAULT_PLANS = {1: "1=corrupt 2=wrong-schema", 2: "1=oversized"}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Three SuperNodes: node 0 holds only its partition's folder and trains in a node worker, node 1 splits the
    whole data set and trains in a node worker, node 2 holds its folder and trains in the ClientApp's own process
    (no worker-socket): the relay and the in-process path in one run."""
    from fl_sparse.config.compose import compose
    from fl_sparse.flower.local import LocalFlower
    from fl_sparse.flower.partitions import folder_name, write_partitions

    root = tmp_path_factory.mktemp("flower")
    experiment = compose("pffdst", (), PFFDST_SHORT).experiment
    write_partitions(experiment, experiment.load_data(), {}, root / "partitions")
    sockets = [str(root / "workers" / f"node{k}.sock") for k in range(2)]
    nodes = [f"data-path='{root / 'partitions' / folder_name(0)}' worker-socket='{sockets[0]}'",
             f"partition-id=1 worker-socket='{sockets[1]}'",
             f"data-path='{root / 'partitions' / folder_name(2)}'"]
    nodes = [f'{node} fault-plan="{FAULT_PLANS.get(k, "")}"' for k, node in enumerate(nodes)]
    with LocalFlower({"HF_HUB_OFFLINE": "1"}, supernodes=nodes, workers=sockets) as flower:
        flower.root = root
        yield flower


def deployed(cluster, app: Path, name: str):
    """Run PFFDST_SHORT on the cluster; (final checkpointed state, per-round metrics, run status)."""
    out = cluster.root / name
    config = run_config(*PFFDST_SHORT, **{"checkpoint-dir": str(out / "checkpoints"),
                                          "metrics-file": str(out / "metrics.jsonl"), "node-wait": 300.0})
    status = cluster.run_to_end(app, config, RUN_TIMEOUT)
    assert status["status"] == "finished:completed", (status["status-details"], f"logs in {cluster.folder.name}")
    return (*read_results(out), status)


def test_loopback_deployment_matches_the_in_process_engine(cluster):
    """2 rounds of PFFDST through a SuperLink and 3 SuperNodes, two of them with node workers: the same final
    model, bit for bit (every process runs the same CPU kernels with 1 thread), and the same codec bytes as the
    in-process engine; the workers trained their clients, round 2 with the frozen part they kept."""
    from fl_sparse.flower import APP_DIR

    started = time.monotonic()
    state, metrics, status = deployed(cluster, APP_DIR, "honest")
    print(f"deployment run: {time.monotonic() - started:.1f} s wall; Flower reports {status['network-traffic']}")
    torch.set_num_threads(1)
    expected, expected_metrics = in_process_run(run_config(*PFFDST_SHORT))
    assert state.round == 2 and state.freeze_version == 1
    assert_same_weights(state.weights, expected.weights)
    assert state.cumulative_bytes == expected.cumulative_bytes
    assert [m["rejected_clients"] for m in metrics] == [0, 0]
    for ours, theirs in zip(metrics, expected_metrics):
        assert (ours["uplink_bytes"], ours["downlink_bytes"]) == (theirs["uplink_bytes"], theirs["downlink_bytes"])
        assert ours["flower_uplink_bytes"] > ours["uplink_bytes"]
    for k in range(2):
        trained = [line for line in cluster.log(f"worker{k}").read_text().splitlines() if "node worker: run" in line]
        assert [line.split(" client ")[0].split(" round ")[1] for line in trained[-2:]] == ["1", "2"], trained


@pytest.mark.slow  # another deployment run (about 90 s on a loaded 2-core host); the loopback Grid test covers it
def test_deployment_with_faulty_supernodes_rejects_them_and_goes_on(cluster):
    """SuperNodes 1 and 2 run a ClientApp that corrupts (round 1), oversizes (round 1) or sends another
    model's payload (round 2): each reply is rejected, the rounds aggregate the honest ones."""
    state, metrics, _ = deployed(cluster, FAULTY_APP, "faulty")
    assert [m["rejected_clients"] for m in metrics] == [2, 1]
    assert metrics[0]["flower_uplink_bytes"] > 64 * 2**20 > 10 * metrics[0]["uplink_bytes"]
    torch.set_num_threads(1)
    expected, _ = in_process_run(run_config(*PFFDST_SHORT), damage={("1", 1), ("1", 2), ("2", 1)})
    assert_same_weights(state.weights, expected.weights)
