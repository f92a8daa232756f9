"""The node worker (``fl-sparse flower node-worker``, fl_sparse.flower.nodeworker and worker_wire): the per-message
ClientApp relays to a long-lived worker over a Unix socket, and the run stays bitwise the in-process one.

The workers here are real processes (the command); the ClientApps run in this process on a loopback ``Grid``
(tests/flower_helpers.py). The loopback deployment with workers is in tests/test_flower.py."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
import warnings

import pytest
import torch

pytest.importorskip("flwr", reason="the flower extra is not installed: pip install 'fl-sparse[flower]'")

from flower_helpers import PFFDST_SHORT, assert_same_weights, flower_run, in_process_run, run_config  # noqa: E402

from fl_sparse.core.errors import ConfigError  # noqa: E402
from fl_sparse.flower import worker_wire  # noqa: E402
from fl_sparse.flower.nodeworker import NodeWorker  # noqa: E402
from fl_sparse.flower.worker_wire import MAGIC, PAYLOAD_LENGTH, PREFIX, VERSION, NodeWorkerError  # noqa: E402

START_TIMEOUT = 300  # s: a worker imports torch before it listens; slow on a loaded 2-core machine


def test_a_frame_round_trips_and_a_bad_one_is_refused_before_its_payload_is_read():
    sender, receiver = socket.socketpair()
    with sender, receiver:
        receiver.settimeout(5)
        worker_wire.write_frame(sender, {"round": 3}, b"\x00\x01payload")
        assert worker_wire.read_frame(receiver, lambda header: 9) == ({"round": 3}, b"\x00\x01payload")
        # a payload of 1 TiB is announced and none follows: refused from its length alone, nothing allocated
        sender.sendall(PREFIX.pack(MAGIC, VERSION, 2) + b"{}" + PAYLOAD_LENGTH.pack(2**40))
        with pytest.raises(NodeWorkerError, match="payload of 1099511627776 bytes exceeds the 100 bytes"):
            worker_wire.read_frame(receiver, lambda header: 100)
    for frame, error in ((b"XXXX" + bytes(5), "not a node worker frame"),
                         (PREFIX.pack(MAGIC, VERSION, 2**30), "header of 1073741824 bytes exceeds"),
                         (PREFIX.pack(MAGIC, VERSION, 3) + b"[1]" + PAYLOAD_LENGTH.pack(0), "not a JSON object"),
                         (PREFIX.pack(MAGIC, VERSION, 10) + b"{}", "connection closed 2 bytes into a 10-byte read")):
        sender, receiver = socket.socketpair()
        with sender, receiver:
            sender.sendall(frame)
            sender.shutdown(socket.SHUT_WR)
            with pytest.raises(NodeWorkerError, match=error):
                worker_wire.read_frame(receiver, lambda header: 100)


def test_the_worker_listens_only_in_a_private_directory(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)
    with pytest.raises(ConfigError, match=r"must be a directory of this user with mode 0700 .* chmod 700"):
        NodeWorker(shared / "worker.sock").open()
    path = tmp_path / "private" / "worker.sock"
    worker = NodeWorker(path)
    worker.open()
    try:
        assert (os.stat(path.parent).st_mode & 0o777, os.stat(path).st_mode & 0o777) == (0o700, 0o600)
        with pytest.raises(ConfigError, match="another node worker listens there"):
            NodeWorker(path).open()
    finally:
        worker.close()
    assert not path.exists()
    with pytest.raises(NodeWorkerError, match="no node worker at .* start fl-sparse flower node-worker"):
        worker_wire.exchange(str(path), {}, b"")


def start_worker(path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "fl_sparse.cli", "flower", "node-worker", "--socket", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})


def wait_until_listening(process: subprocess.Popen, path) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not path.exists():
        assert process.poll() is None, process.stdout.read().decode()[-2000:]
        assert time.monotonic() < deadline, f"no node worker on {path} after {START_TIMEOUT} s"
        time.sleep(0.2)


@contextlib.contextmanager
def running_workers(folder, count: int):
    """``count`` node workers (the command), each on its own socket in ``folder``; their socket paths."""
    paths = [folder / f"node{k}.sock" for k in range(count)]
    processes = [start_worker(path) for path in paths]
    try:
        for process, path in zip(processes, paths):
            wait_until_listening(process, path)
        yield [str(path) for path in paths], processes
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            process.stdout.close()


@pytest.fixture(scope="module")
def workers(tmp_path_factory):
    with running_workers(tmp_path_factory.mktemp("workers"), 3) as (paths, processes):
        yield paths, processes


@contextlib.contextmanager
def no_training_in_this_process():
    def fail(*args, **kwargs):
        raise AssertionError("the ClientApp trained in its own process")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("fl_sparse.flower.client_side.train_on_downlink", fail)
        yield


def test_a_restarted_worker_goes_on_with_the_frozen_part_its_client_held(tmp_path):
    """The server sends a frozen part once: a worker restarted on the same socket reads it from its private
    directory; a torn file counts as nothing kept; evicted runs leave no file."""
    from fl_sparse.flower import nodeworker
    from fl_sparse.flower.client_side import FrozenMemory

    path = tmp_path / "private" / "worker.sock"
    path.parent.mkdir(mode=0o700)
    memory = FrozenMemory(2, {"fc.weight": torch.tensor([[True, False]])}, {"fc.weight": torch.tensor([[0.5, 0.0]])})
    NodeWorker(path).remember((7, 3), memory)
    back = NodeWorker(path).recall((7, 3))  # a fresh process: nothing in memory
    assert back.version == 2 and torch.equal(back.frozen["fc.weight"], memory.frozen["fc.weight"])
    assert torch.equal(back.values["fc.weight"], memory.values["fc.weight"])
    assert NodeWorker(path).recall((7, 4)).version == 0  # another client of the run held nothing
    NodeWorker(path).memory_file((8, 3)).write_bytes(b"torn")
    assert NodeWorker(path).recall((8, 3)).version == 0
    worker = NodeWorker(path)
    for run in range(100, 100 + nodeworker.RUNS_KEPT + 1):
        worker.remember((run, 0), memory)
    assert not worker.memory_file((100, 0)).exists() and worker.memory_file((101, 0)).exists()


def test_node_workers_match_the_in_process_engine_bitwise(task_identity, workers, tmp_path):
    """PFFDST with 1-round stages through three node workers: round 2 delivers the frozen part, which the
    workers keep for the run; the final weights, mask and bytes are the in-process engine's, bit for bit."""
    paths, _ = workers
    torch.set_num_threads(1)
    config = run_config(*PFFDST_SHORT)
    expected, expected_metrics = in_process_run(config)
    nodes = [{"partition-id": k, "worker-socket": paths[k]} for k in range(3)]
    state, metrics = flower_run(config, 3, out=tmp_path, node_configs=nodes, client_side=no_training_in_this_process,
                                run_id=11)
    assert state.freeze_version == expected.freeze_version == 1
    assert_same_weights(state.weights, expected.weights)
    assert_same_weights(state.mask, expected.mask)
    assert state.cumulative_bytes == expected.cumulative_bytes
    assert [m["rejected_clients"] for m in metrics] == [0, 0]
    assert [m["uplink_bytes"] for m in metrics] == [m["uplink_bytes"] for m in expected_metrics]


def test_the_relay_imports_no_torch_and_passes_on_the_workers_refusal(workers):
    """A fresh process, as Flower starts one per message: the ClientApp relays a junk downlink to a worker, which
    refuses it in one line (and goes on serving); the relay's process never imported torch."""
    paths, processes = workers
    script = textwrap.dedent(f"""
        import sys
        from flwr.app import Context, Message, RecordDict
        from flwr.supercore.task_identity import TaskIdentity
        from fl_sparse.flower import clientapp, messages
        TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
        config = {run_config(*PFFDST_SHORT)!r}
        down = Message(messages.content(b"junk", round=1, client=0, freeze_version=0), 100, "train", group_id="1")
        context = Context(12, 100, {{"partition-id": 0, "worker-socket": {paths[0]!r}}}, RecordDict(), config)
        try:
            clientapp.train(down, context)
        except Exception as error:
            print(type(error).__name__, error)
        print("torch loaded:", "torch" in sys.modules)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "torch loaded: False", done.stdout + done.stderr
    assert lines[0].startswith("NodeWorkerError node worker: payload truncated"), lines  # the codec's refusal
    assert processes[0].poll() is None  # the worker goes on


def test_a_node_worker_that_dies_mid_round_makes_its_client_rejected(task_identity, workers, tmp_path, monkeypatch):
    """Node 1's worker is killed right after its ClientApp handed it round 2's downlink: the ClientApp fails, the
    server rejects client 1 with a warning and aggregates the others, as the in-process engine does when it
    rejects client 1's update in round 2."""
    paths, _ = workers
    torch.set_num_threads(1)
    config = run_config(*PFFDST_SHORT)
    with running_workers(tmp_path / "doomed", 1) as ([doomed_path], [doomed]):
        handed = worker_wire.write_frame

        def hand_then_kill(sock, header, payload=b""):
            handed(sock, header, payload)
            if (header.get("op"), header.get("round"), header.get("client")) == ("train", 2, 1):
                doomed.kill()
                doomed.wait()

        monkeypatch.setattr(worker_wire, "write_frame", hand_then_kill)
        nodes = [{"partition-id": k, "worker-socket": doomed_path if k == 1 else paths[k]} for k in range(3)]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            state, metrics = flower_run(config, 3, out=tmp_path / "run", node_configs=nodes, run_id=13)
    rejected = [str(w.message) for w in caught if "rejected" in str(w.message)]
    assert len(rejected) == 1 and rejected[0].startswith("round 2: client 1 rejected: the ClientApp failed: "
                                                         "NodeWorkerError: the node worker at "), rejected
    assert [m["rejected_clients"] for m in metrics] == [0, 1]
    expected, _ = in_process_run(config, damage={("2", 1)})
    assert_same_weights(state.weights, expected.weights)
