"""Per-node data (fl_sparse.flower.partitions): ``fl-sparse flower partition`` writes one folder per client, a
SuperNode started with ``data-path`` loads that folder alone, and the run stays bitwise the in-process one."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("flwr", reason="the flower extra is not installed: pip install 'fl-sparse[flower]'")

from flower_helpers import assert_same_weights, flower_run, in_process_run, run_config  # noqa: E402

from fl_sparse.config.compose import compose  # noqa: E402
from fl_sparse.core.errors import ConfigError, DataError  # noqa: E402
from fl_sparse.engine.experiment import Experiment  # noqa: E402
from fl_sparse.flower import partitions, setup  # noqa: E402

DEMO_SHORT = ("Experiment.rounds = 2", "Experiment.local_epochs = 1")


@pytest.fixture(scope="module")
def demo_partitions(tmp_path_factory):
    """The demo preset's 20 partitions, written by the command; (folder, the command's output)."""
    from fl_sparse.cli.main import main

    out = tmp_path_factory.mktemp("partitions") / "demo"
    with contextlib.redirect_stdout(output := io.StringIO()):
        assert main(["flower", "partition", "demo", "--out", str(out)]) == 0
    return out, output.getvalue()


def node_folder(out, client: int):
    return out / partitions.folder_name(client)


@contextlib.contextmanager
def whole_data_set_unreadable():
    """Reading the whole data set fails: a node must get by with its own folder."""
    def fail(*args, **kwargs):
        raise AssertionError("a node read the whole data set")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Experiment, "load_data", fail)
        patch.setattr("fl_sparse.data.federated.load_embedded_cifar10", fail)
        patch.setattr("fl_sparse.data.federated.load_cifar10", fail)
        yield


def test_partition_writes_each_clients_samples_and_a_manifest_without_pickle(demo_partitions):
    out, printed = demo_partitions
    data = compose("feddst", ("demo",)).experiment.load_data()
    assert sorted(path.name for path in out.iterdir()) == [f"partition-{k:04d}" for k in range(20)]
    assert printed.startswith("wrote 20 partitions of embedded CIFAR-10 subset") and "data-path=" in printed
    for client in range(20):
        indices = data.client_train[client]
        manifest = json.loads((node_folder(out, client) / partitions.MANIFEST).read_text())
        assert (manifest["partition"], manifest["num_partitions"], manifest["num_samples"]) == (client, 20, len(indices))
        assert manifest["label_histogram"] == torch.bincount(data.train_y[indices], minlength=10).tolist()
        assert manifest["split"] == {"dataset": "CIFAR10", "num_clients": 20, "dirichlet_alpha": 0.5,
                                     "partition_seed": 0, "partitioner": "BalancedDirichlet"}
        assert manifest["composition"] == {"presets": ["demo"], "bindings": []}
        with np.load(node_folder(out, client) / partitions.ARRAYS, allow_pickle=False) as arrays:
            assert np.array_equal(arrays["images"], data.train_x[indices].numpy())
            assert np.array_equal(arrays["labels"], data.train_y[indices].numpy())
        assert manifest["sha256"] == partitions.client_digest(data, client)


def test_partition_refuses_a_folder_that_holds_something(demo_partitions, capsys):
    from fl_sparse.cli.main import main

    assert main(["flower", "partition", "demo", "--out", str(demo_partitions[0])]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err


def test_a_node_builds_from_its_folder_and_never_reads_the_data_dir(demo_partitions, tmp_path):
    out, _ = demo_partitions
    whole = compose("feddst", ("demo",)).experiment.load_data()
    # The run's data dir does not exist on this node: only its folder is read.
    composition = setup.Composition("feddst", ("demo",), ("DATA_DIR = '/nonexistent/cifar'",))
    with whole_data_set_unreadable():
        built = setup.build(composition, 1, str(node_folder(out, 3)))
    data = built.server.data
    assert data.num_clients == 20 and [len(i) for i in data.client_train] == [len(whole.client_train[3]) * (k == 3)
                                                                              for k in range(20)]
    assert torch.equal(data.train_x[data.client_train[3]], whole.train_x[whole.client_train[3]])
    assert torch.equal(data.mean, whole.mean) and torch.equal(data.std, whole.std)

    with pytest.raises(ConfigError, match="re-run fl-sparse flower partition with the run's presets"):
        setup.build(setup.Composition("feddst", ("demo",), ("Experiment.num_clients = 10",)), 1,
                    str(node_folder(out, 3)))
    tampered = tmp_path / "tampered"
    shutil.copytree(node_folder(out, 3), tampered)
    with np.load(tampered / partitions.ARRAYS) as arrays:
        images, labels = arrays["images"].copy(), arrays["labels"]
    images[0, 0, 0, 0] ^= 1
    np.savez(tampered / partitions.ARRAYS, images=images, labels=labels)
    with pytest.raises(DataError, match="does not match the SHA-256"):
        setup.build(setup.Composition("feddst", ("demo",)), 1, str(tampered))
    with pytest.raises(DataError, match="cannot read manifest.json"):
        partitions.read_manifest(tmp_path / "absent")


def test_nodes_holding_only_their_partition_match_the_in_process_engine_bitwise(task_identity, demo_partitions,
                                                                                tmp_path):
    """2 rounds of FedDST on the demo preset: 20 nodes, each started with data-path and unable to read the
    whole data set, end with the in-process engine's model, mask and bytes, bit for bit."""
    out, _ = demo_partitions
    torch.set_num_threads(1)
    config = run_config(*DEMO_SHORT, algorithm="feddst", presets=("demo",))
    expected, expected_metrics = in_process_run(config)
    nodes = [{"data-path": str(node_folder(out, k))} for k in range(20)]
    state, metrics = flower_run(config, 20, out=tmp_path, node_configs=nodes, client_side=whole_data_set_unreadable)
    assert state.round == 2
    assert_same_weights(state.weights, expected.weights)
    assert_same_weights(state.mask, expected.mask)
    assert state.cumulative_bytes == expected.cumulative_bytes
    assert [m["rejected_clients"] for m in metrics] == [0, 0]
    assert [m["test_accuracy"] for m in metrics if "test_accuracy" in m] == [
        m["test_accuracy"] for m in expected_metrics if "test_accuracy" in m]


def test_the_server_ignores_a_node_whose_data_is_not_its_partition(task_identity, demo_partitions, tmp_path):
    """Node 0 holds client 1's samples under a manifest that claims partition 0: its digest is not that of the
    server's partition 0, so the server never takes it, and says so."""
    out, _ = demo_partitions
    forged = tmp_path / "forged"
    shutil.copytree(node_folder(out, 1), forged)
    manifest = json.loads((forged / partitions.MANIFEST).read_text())
    (forged / partitions.MANIFEST).write_text(json.dumps({**manifest, "partition": 0}))
    nodes = [{"data-path": str(forged if k == 0 else node_folder(out, k))} for k in range(20)]
    config = run_config(*DEMO_SHORT, algorithm="feddst", presets=("demo",), **{"node-wait": 1.0})
    with warnings.catch_warnings(record=True) as caught, pytest.raises(ConfigError, match="raise node-wait"):
        warnings.simplefilter("always")
        flower_run(config, 20, out=tmp_path, node_configs=nodes)
    assert any("holds other data than partition 0" in str(w.message) for w in caught)
