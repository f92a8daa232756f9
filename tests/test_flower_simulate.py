"""``fl-sparse flower simulate`` end to end: it behaves like ``fl-sparse run`` (progress bar, summary line, the same
MLflow run), runs its actors at nice 0 on a Ray of its own, and leaves no Flower or Ray process behind, also when
interrupted. Each test starts real Flower processes (about a minute on a busy 2-core machine): marked slow.

Every process the command starts inherits the environment variable ``FL_SPARSE_TEST_MARK``; the tests look for
it in ``/proc`` to find them, wherever they were re-parented."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="the flower extra is not installed: pip install 'fl-sparse[flower]'")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs /proc")]

COMMAND_TIMEOUT_S = 600
MARK = "FL_SPARSE_TEST_MARK"


def marked_processes(mark: str) -> dict[int, str]:
    """pid -> command line of every live process whose environment carries ``mark``."""
    found = {}
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"{MARK}={mark}".encode() in (proc / "environ").read_bytes().split(b"\0"):
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:  # gone, or not ours to read
            continue
    return found


class ActorNiceness(threading.Thread):
    """Records the nice value of every ClientApp actor that carries ``mark`` while the command runs."""

    def __init__(self, mark: str):
        super().__init__(daemon=True)
        self.mark, self.seen, self.done = mark, {}, threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.5):
            for pid, command in marked_processes(self.mark).items():
                if command.startswith("ray::ClientAppActor"):
                    with open(f"/proc/{pid}/stat") as stat:  # field 19: nice (after the ")" of the name)
                        self.seen[pid] = int(stat.read().rsplit(")", 1)[1].split()[16])


def simulate(tmp_path: Path, *args: str, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    mark = uuid.uuid4().hex
    process = subprocess.Popen([sys.executable, "-m", "fl_sparse.cli", "flower", "simulate", *args],
                               env={**os.environ, MARK: mark, "HF_HUB_OFFLINE": "1", **(env or {})}, cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return process, mark


def test_simulate_behaves_like_fl_sparse_run_and_leaves_nothing_behind(tmp_path):
    import mlflow

    from fl_sparse.cli.main import main

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # A stray Ray address in the environment: joining it would fail; the command's Flower starts its own Ray.
    process, mark = simulate(tmp_path, "feddst", "demo", "--rounds", "3", "--tracking-uri", store,
                             "--experiment-name", "simulated", env={"RAY_ADDRESS": "127.0.0.1:1"})
    niceness = ActorNiceness(mark)
    niceness.start()
    started = time.monotonic()
    output = process.communicate(timeout=COMMAND_TIMEOUT_S)[0].decode(errors="replace")
    niceness.done.set()
    print(f"fl-sparse flower simulate feddst demo --rounds 3: {time.monotonic() - started:.1f} s\n{output[-3000:]}")
    assert process.returncode == 0, output[-3000:]
    assert marked_processes(mark) == {}  # no SuperLink, SuperExec, flwr-simulation or Ray process left
    assert niceness.seen and set(niceness.seen.values()) == {0}, niceness.seen
    lines = output.replace("\r", "\n").splitlines()
    assert any("3/3 [" in line for line in lines)  # the progress bar reached the end
    summary = next(line for line in lines if line.startswith("finished 3 of 3 rounds: test accuracy best"))
    assert lines[-3] == summary and lines[-2].startswith("MLflow run ")
    for once in ("Starting Flower Simulation", "fl_sparse: 20 SuperNodes serve partitions 0..19"):
        assert sum(once in line for line in lines) == 1, once  # Flower's lines print once

    # fl-sparse run of the same composition, into the same store: the same MLflow run, bit for bit
    torch_threads = ["--threads", "1"]  # simulate's default: one thread per actor and on the server
    assert main(["run", "feddst", "demo", "--rounds", "3", *torch_threads, "--tracking-uri", store,
                 "--experiment-name", "in_process"]) == 0
    client = mlflow.MlflowClient(store)
    (flower,) = client.search_runs([client.get_experiment_by_name("simulated").experiment_id])
    (local,) = client.search_runs([client.get_experiment_by_name("in_process").experiment_id])
    assert flower.info.status == local.info.status == "FINISHED"
    assert flower.info.run_name == local.info.run_name
    assert flower.data.params == local.data.params
    assert flower.data.tags.keys() == local.data.tags.keys()
    assert {k: v for k, v in flower.data.tags.items() if not k.startswith("mlflow.")} == {
        k: v for k, v in local.data.tags.items() if not k.startswith("mlflow.")}
    assert set(flower.data.metrics) - set(local.data.metrics) == {"flower_uplink_bytes", "flower_downlink_bytes"}
    for key in ("cumulative_gb", "test_accuracy", "train_loss", "density"):
        history = [(m.step, m.value) for m in client.get_metric_history(flower.info.run_id, key)]
        assert history == [(m.step, m.value) for m in client.get_metric_history(local.info.run_id, key)], key
    assert [m.step for m in client.get_metric_history(flower.info.run_id, "cumulative_gb")] == [1, 2, 3]
    artifacts = lambda run: sorted(a.path for a in client.list_artifacts(run.info.run_id))  # noqa: E731
    assert artifacts(flower) == artifacts(local)
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the tracker exports it; later tests choose their own


def test_ctrl_c_stops_the_run_and_every_flower_process(tmp_path):
    process, mark = simulate(tmp_path, "feddst", "demo", "--rounds", "50", "--no-tracking")
    deadline = time.monotonic() + COMMAND_TIMEOUT_S
    while not any(command.startswith("ray::ClientAppActor") for command in marked_processes(mark).values()):
        assert process.poll() is None and time.monotonic() < deadline, "the simulation never started its actors"
        time.sleep(0.5)
    process.send_signal(signal.SIGINT)  # what Ctrl-C sends the command (Flower's processes have their own groups)
    output = process.communicate(timeout=120)[0].decode(errors="replace")
    assert process.returncode == 130, output[-3000:]
    assert output.rstrip().endswith("fl-sparse: interrupted; the Flower run and its SuperLink are stopped")
    assert marked_processes(mark) == {}
