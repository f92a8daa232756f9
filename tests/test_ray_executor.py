"""RayExecutor trains what Sequential trains, bit for bit: on a local Ray it starts, on a cluster started with
``ray start`` that it joins, after checkpoint and resume, and when a worker process is killed mid-round
(restarted and its clients retried, or the round fails with one line when restarts are used up).

Everything runs at one torch thread, in this process and in each worker: thread counts change how oneDNN
splits reductions, so bitwise equality needs the same count on both sides (see ray_executor's docstring).
Skipped where the ``ray`` extra is not installed."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch

ray = pytest.importorskip("ray")

from helpers import play, simulation  # noqa: E402

from fl_sparse.config.compose import compose  # noqa: E402
from fl_sparse.core.interfaces import RoundContext  # noqa: E402
from fl_sparse.engine.loop import run_rounds  # noqa: E402
from fl_sparse.parts.executors.ray_executor import RayExecutor, WorkerLost  # noqa: E402
from fl_sparse.runtime import checkpoint  # noqa: E402
from fl_sparse.training.client import ClientTask, generator  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def assert_same_states(want, got):
    for part in ("weights", "mask", "frozen"):
        a, b = getattr(want, part), getattr(got, part)
        assert a.keys() == b.keys(), part
        for name in a:
            assert torch.equal(a[name], b[name]), f"{part}/{name}"
    assert got.cumulative_bytes == want.cumulative_bytes


def assert_same_results(want, got):
    assert [r.client_id for r in got] == [r.client_id for r in want]
    for a, b in zip(want, got):
        assert a.num_samples == b.num_samples and a.train_loss == b.train_loss
        assert all(torch.equal(a.weights[n], b.weights[n]) for n in a.weights)
        assert a.mask.keys() == b.mask.keys() and all(torch.equal(a.mask[n], b.mask[n]) for n in a.mask)


def final_states(sim, executor=None) -> list:
    if executor is not None:
        sim.experiment.executor = executor
    return [after for _, after, _ in play(sim)]


@pytest.fixture(scope="class")
def executor():
    """One executor and the local Ray (2 CPUs) it starts, shared by a class's tests; closed after the last."""
    assert not ray.is_initialized()
    executor = RayExecutor(num_workers=2, max_restarts=1)
    yield executor
    executor.close()
    assert not ray.is_initialized(), "the executor shuts down the local Ray it started"


class TestLocalRay:
    @pytest.mark.parametrize("algorithm, bindings", [
        ("feddst", ["Readjusting.readjust_every = 1"]),  # clients prune and regrow by |gradient| every round
        ("pffdst", []),  # round 1 ends stage 1: round 2 trains around frozen weights, per-client payloads
    ])
    def test_two_rounds_equal_sequential(self, executor, algorithm, bindings):
        want = final_states(simulation(algorithm, *bindings))
        got = final_states(simulation(algorithm, *bindings), executor)
        assert len(executor.worker_pids()) == 2 and ray.is_initialized()
        for a, b in zip(want, got):
            assert_same_states(a, b)
        if algorithm == "pffdst":
            assert any(f.any() for f in got[-1].frozen.values())

    def test_checkpoint_and_resume_equal_sequential(self, executor, tmp_path):
        bindings = ["TwoStage.readjust_every = 1", "UnionAverage.server_momentum = 0.5"]  # server state too
        for name, runner in (("sequential", None), ("ray", executor)):
            sim = simulation("pffdst", *bindings, rounds=4)
            if runner:
                sim.experiment.executor = runner
            run_rounds(sim, callbacks=[checkpoint.Checkpointer(tmp_path / name, 1, sim, "config")])
        state, meta = checkpoint.read(tmp_path / "ray", "config")  # KEEP=2: round 4 is newest, round 3 stays
        assert state.round == 4
        resumed = simulation("pffdst", *bindings, rounds=4)
        resumed.experiment.executor = executor
        state, meta = checkpoint.load(tmp_path / "ray" / "round-000003")
        state = checkpoint.apply(resumed, state, meta)
        run_rounds(resumed, state, callbacks=[checkpoint.Checkpointer(tmp_path / "resumed", 1, resumed, "config")])
        want, want_meta = checkpoint.load(tmp_path / "sequential" / "round-000004")
        for name in ("ray", "resumed"):
            got, got_meta = checkpoint.load(tmp_path / name / "round-000004")
            assert_same_states(want, got)
            assert got_meta["codec_state"] == want_meta["codec_state"]
            assert got_meta["server_tensors"].keys() == want_meta["server_tensors"].keys()
            assert all(torch.equal(want_meta["server_tensors"][k], v) for k, v in got_meta["server_tensors"].items())

    def test_killed_worker_is_restarted_and_its_clients_retried(self, executor):
        sim, tasks, ctx = long_round()
        want = sim.experiment.executor.train(sim.job, tasks, ctx)  # Sequential
        before = started_pids(executor, sim, tasks, ctx)
        got, killed = train_and_kill(executor, sim, tasks, ctx, before[0])
        assert killed, "the round ended before the worker could be killed"
        assert_same_results(want, got)
        after = executor.worker_pids()
        assert after[0] != before[0] and after[1] == before[1]

    def test_worker_dead_for_good_fails_the_round_in_one_line(self, executor):
        executor.close_workers()  # leave the 2 CPUs to an executor that may not restart its workers
        doomed = RayExecutor(num_workers=2, max_restarts=0)
        try:
            sim, tasks, ctx = long_round()
            with pytest.raises(WorkerLost, match=r"^round 1: a Ray worker died after 0 restart\(s\) and the round "
                                                 r"failed, no client dropped") as error:
                train_and_kill(doomed, sim, tasks, ctx, started_pids(doomed, sim, tasks, ctx)[0])
            assert "\n" not in str(error.value)
        finally:
            doomed.close()
        assert ray.is_initialized(), "an executor that did not start Ray leaves it running"


def long_round():
    """A round of 6 clients x 3 epochs (~1 s per worker), long enough to kill a worker during it."""
    sim = simulation("feddst", "Experiment.clients_per_round = 6", "Experiment.local_epochs = 3")
    state, exp = sim.initial_state(), sim.experiment
    ctx, clients = RoundContext(exp.schedule.phase(1), generator(exp.seed, "mask", 1)), sim.sample_clients(1)
    tasks = [ClientTask(c, state.weights, state.mask, state.frozen, sim.data.client_train[c], sim.experiment.seed, 1)
             for c in clients]
    return sim, tasks, ctx


def started_pids(executor, sim, tasks, ctx) -> list[int]:
    executor.train(sim.job, tasks[:1], ctx)  # starts the workers if they are not running
    return executor.worker_pids()


def cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def train_and_kill(executor, sim, tasks, ctx, pid: int):
    """Train ``tasks`` in a thread and SIGKILL worker ``pid`` once it has started computing; returns
    (results, whether the kill landed while the round was still running). Re-raises the round's error."""
    outcome = {}

    def round_():
        try:
            outcome["results"] = executor.train(sim.job, tasks, ctx)
        except BaseException as error:  # noqa: BLE001 (handed to the test thread)
            outcome["error"] = error

    start = cpu_ticks(pid)
    thread = threading.Thread(target=round_)
    thread.start()
    deadline = time.time() + 60
    while cpu_ticks(pid) < start + 20 and thread.is_alive() and time.time() < deadline:  # 0.2 s of CPU
        time.sleep(0.01)
    killed = thread.is_alive()
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=300)
    assert not thread.is_alive()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["results"], killed


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def own_processes(marker: str) -> list[int]:
    """PIDs of the processes whose command line names ``marker`` (the cluster's own temp dir)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@contextlib.contextmanager
def ray_head(attempts: int = 3):
    """`ray start --head --block` on 127.0.0.1 as a child process in its own process group, with free ports and a
    private temp dir; yields its address. Afterwards it stops exactly that cluster: the process group, then any
    process naming the temp dir. A start-up that times out is retried: on an overloaded machine Ray's raylet can
    give up on its agents (it waits 15 s for them)."""
    for attempt in range(attempts):
        temp = tempfile.mkdtemp(prefix="flray", dir="/tmp")  # short: Ray's unix socket paths must stay < 108 bytes
        port, *others = free_ports(8)
        names = ["--ray-client-server-port", "--dashboard-port", "--dashboard-agent-listen-port",
                 "--dashboard-agent-grpc-port", "--runtime-env-agent-port", "--metrics-export-port",
                 "--node-manager-port"]
        command = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--port", str(port),
                   "--node-ip-address", "127.0.0.1", "--num-cpus", "2", "--num-gpus", "0", "--include-dashboard",
                   "false", "--disable-usage-stats", "--temp-dir", temp, "--object-store-memory", str(200 * 2**20)]
        for name, value in zip(names, others):
            command += [name, str(value)]
        log = Path(temp) / "ray_start.log"
        with open(log, "w") as out:
            cluster = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 180
            while "Ray runtime started" not in log.read_text() and cluster.poll() is None and time.time() < deadline:
                time.sleep(0.2)
            if "Ray runtime started" in log.read_text() and cluster.poll() is None:
                yield f"127.0.0.1:{port}", cluster
                return
            assert attempt + 1 < attempts, f"ray start failed {attempts} times: {log.read_text()[-2000:]}"
        finally:
            stop(cluster, temp)


def stop(cluster: subprocess.Popen, temp: str) -> None:
    try:
        os.killpg(cluster.pid, signal.SIGTERM)
        cluster.wait(timeout=60)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(cluster.pid, signal.SIGKILL)
    cluster.wait()
    deadline = time.time() + 30
    while own_processes(temp) and time.time() < deadline:
        time.sleep(0.2)
    for pid in own_processes(temp):  # what outlived its group: still ours, named by our temp dir
        os.kill(pid, signal.SIGKILL)
    assert not own_processes(temp)
    shutil.rmtree(temp, ignore_errors=True)


def test_joins_a_cluster_started_with_ray_start():
    assert not ray.is_initialized()
    want = final_states(simulation("feddst", "Readjusting.readjust_every = 1"))
    with ray_head() as (address, cluster):
        binding = ["Experiment.executor = @RayExecutor()", f"RayExecutor.address = '{address}'",
                   "RayExecutor.num_workers = 2"]
        sim = simulation("feddst", "Readjusting.readjust_every = 1", *binding)
        assert isinstance(sim.experiment.executor, RayExecutor)
        try:
            got = final_states(sim)
            assert ray.is_initialized() and ray.cluster_resources()["CPU"] == 2
        finally:
            sim.experiment.executor.close()
        assert not ray.is_initialized()
        assert cluster.poll() is None, "disconnecting leaves the cluster running"
    for a, b in zip(want, got):
        assert_same_states(a, b)


def test_missing_ray_is_one_line_naming_the_extra(monkeypatch):
    import importlib.util

    from fl_sparse.core.errors import ConfigError, first_line

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ConfigError) as error:
        RayExecutor()
    assert first_line(error.value) == "RayExecutor needs Ray, which is not installed: pip install 'fl-sparse[ray]'"


def test_parameters_are_validated_before_anything_starts():
    from fl_sparse.core.errors import ConfigError

    for bad in ({"num_workers": 0}, {"threads_per_worker": 0}, {"num_gpus_per_worker": -1}, {"max_restarts": -1},
                {"address": ""}):
        with pytest.raises(ConfigError, match="RayExecutor"):
            RayExecutor(**bad)
    assert not ray.is_initialized()


def test_cli_flags_are_the_bindings():
    from fl_sparse.cli import flags
    from fl_sparse.cli.main import _parser
    from fl_sparse.config.catalog import registered_parts

    args = _parser().parse_args(["run", "feddst", "--executor", "ray", "--workers", "3",
                                     "--ray-address", "10.0.0.1:6379"])
    bindings = flags.bindings(args)
    assert bindings == ["Experiment.executor = @RayExecutor()", "RayExecutor.num_workers = 3",
                        "RayExecutor.address = '10.0.0.1:6379'"]
    executor = compose("feddst", [], bindings).experiment.executor
    assert isinstance(executor, RayExecutor) and (executor.num_workers, executor.address) == (3, "10.0.0.1:6379")
    assert not ray.is_initialized(), "building the executor starts nothing"
    args = _parser().parse_args(["run", "feddst", "--executor", "vectorized"])
    assert flags.bindings(args) == ["Experiment.executor = @Vectorized()"]
    listed = registered_parts()["ClientExecutor"]
    assert "RayExecutor(num_workers=None, address=None, threads_per_worker=1, num_gpus_per_worker=0, " \
           "max_restarts=3)" in listed
