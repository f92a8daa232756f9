"""fl_sparse.data: CIFAR readers, the embedded subset, the Dirichlet partition and FederatedData."""

from __future__ import annotations

import pickle

import gin
import numpy as np
import pytest
import torch

from fl_sparse.core.errors import ConfigError, DataError
from fl_sparse.data import (
    CIFAR10,
    CIFAR100,
    CIFAR_STATS,
    FederatedData,
    dirichlet_partition,
    load_cifar10,
    load_cifar100,
    load_embedded_cifar10,
)

# ---------------------------------------------------------------- CIFAR-100 on a synthetic copy in the real layout

def write_cifar100(root, n_train=300, n_test=100, seed=0, str_keys=False, protocol=2):
    """A tiny CIFAR-100 in the official layout: dicts with b"data" [N, 3072] uint8 and list labels."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    key = (lambda k: k) if str_keys else (lambda k: k.encode())
    splits = {}
    for name, n in (("train", n_train), ("test", n_test)):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = rng.integers(0, 100, size=n).tolist()
        batch = {key("data"): data, key("fine_labels"): fine, key("coarse_labels"): [f // 5 for f in fine],
                 key("filenames"): [f"img_{i}.png".encode() for i in range(n)], key("batch_label"): name.encode()}
        with open(folder / name, "wb") as fh:
            pickle.dump(batch, fh, protocol=protocol)
        splits[name] = (data, np.array(fine))
    meta = {key("fine_label_names"): [f"class{i}".encode() for i in range(100)],
            key("coarse_label_names"): [f"super{i}".encode() for i in range(20)]}
    with open(folder / "meta", "wb") as fh:
        pickle.dump(meta, fh, protocol=protocol)
    return folder, splits


def test_cifar100_reads_the_official_layout(tmp_path):
    folder, splits = write_cifar100(tmp_path)
    for where in (tmp_path, folder, str(folder)):  # the root or the folder itself
        s = load_cifar100(where)
        assert s.train_x.shape == (300, 3, 32, 32) and s.test_x.shape == (100, 3, 32, 32)
        assert s.train_x.dtype == torch.uint8 and s.train_y.dtype == torch.int64
        assert np.array_equal(s.train_x.reshape(300, -1).numpy(), splits["train"][0])
        assert np.array_equal(s.test_y.numpy(), splits["test"][1])
        assert s.num_classes == 100 and s.class_names[7] == "class7" and s.path == str(folder)


@pytest.mark.parametrize("str_keys,protocol", [(True, 2), (False, 5), (True, pickle.HIGHEST_PROTOCOL)])
def test_cifar100_accepts_str_keys_and_python3_pickles(tmp_path, str_keys, protocol):
    _, splits = write_cifar100(tmp_path, str_keys=str_keys, protocol=protocol)
    assert np.array_equal(load_cifar100(tmp_path).train_y.numpy(), splits["train"][1])


def test_cifar100_full_pipeline(tmp_path):
    write_cifar100(tmp_path)
    data = CIFAR100(data_dir=str(tmp_path)).load(num_clients=5, alpha=0.5, seed=0)
    assert data.num_classes == 100 and data.source.startswith("CIFAR-100 from ")
    assert [len(i) for i in data.client_train] == [60] * 5 and [len(i) for i in data.client_test] == [20] * 5


def test_missing_directory_says_which_path_and_how_to_fix(tmp_path):
    with pytest.raises(DataError, match="does not exist") as err:
        load_cifar10(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value) and "embedded" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(DataError) as err:
        load_cifar10(tmp_path)
    assert str(tmp_path / "cifar-10-batches-py" / "data_batch_1") in str(err.value)
    with pytest.raises(DataError, match="no CIFAR-100 found"):
        load_cifar100(tmp_path)


def test_missing_file_is_named(tmp_path):
    folder, _ = write_cifar100(tmp_path)
    (folder / "test").unlink()
    with pytest.raises(DataError, match=f"{folder / 'test'} is missing"):
        load_cifar100(tmp_path)


def _rewrite(path, **changes):
    with open(path, "rb") as fh:
        batch = pickle.load(fh, encoding="bytes")
    batch.update({k.encode(): v for k, v in changes.items()})
    with open(path, "wb") as fh:
        pickle.dump(batch, fh, protocol=2)


@pytest.mark.parametrize("changes,message", [
    ({"data": np.zeros((300, 3000), np.uint8)}, "expected uint8 \\[N, 3072\\]"),
    ({"data": np.zeros((300, 3072), np.float32)}, "expected uint8"),
    ({"fine_labels": [0] * 299}, "expected 300 integer labels"),
    ({"fine_labels": [100] * 300}, "expected \\[0, 99\\]"),
])
def test_malformed_arrays_raise_data_error(tmp_path, changes, message):
    folder, _ = write_cifar100(tmp_path)
    _rewrite(folder / "train", **changes)
    with pytest.raises(DataError, match=message):
        load_cifar100(tmp_path)


def test_garbage_and_foreign_pickles_are_refused(tmp_path):
    folder, _ = write_cifar100(tmp_path)
    (folder / "train").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="cannot read"):
        load_cifar100(tmp_path)
    # A pickle that would call os.system must not run it: only numpy array names resolve.
    (folder / "train").write_bytes(b"cos\nsystem\n(S'echo pwned'\ntR.")
    with pytest.raises(DataError, match="refusing to load os.system"):
        load_cifar100(tmp_path)


# ---------------------------------------------------------------- the embedded subset

def test_embedded_subset_is_balanced_real_cifar10():
    s = load_embedded_cifar10()
    assert s.train_x.shape == (2000, 3, 32, 32) and s.test_x.shape == (500, 3, 32, 32)
    assert s.train_x.dtype == torch.uint8 and s.train_y.dtype == torch.int64
    assert torch.bincount(s.train_y, minlength=10).tolist() == [200] * 10
    assert torch.bincount(s.test_y, minlength=10).tolist() == [50] * 10
    assert 80 < s.train_x.float().mean() < 160  # natural images, not zeros or noise-free constants


def test_cifar10_without_data_dir_uses_the_embedded_subset():
    data = CIFAR10().load(num_clients=10, alpha=0.5, seed=0)
    assert data.source == "embedded CIFAR-10 subset (2000 train / 500 test images)"
    assert data.num_clients == 10 and data.num_classes == 10
    assert all(len(i) == 200 for i in data.client_train) and all(len(i) == 50 for i in data.client_test)


def test_missing_embedded_file_raises_data_error(tmp_path):
    with pytest.raises(DataError, match="make_embedded_subset"):
        load_embedded_cifar10(tmp_path / "gone.npz")


# ---------------------------------------------------------------- the full CIFAR-10 (../shared/data)

@pytest.fixture(scope="module")
def cifar10_full(cifar10_root):
    return load_cifar10(cifar10_root)


@pytest.mark.cifar
def test_full_cifar10_counts_and_shapes(cifar10_full):
    s = cifar10_full
    assert s.train_x.shape == (50_000, 3, 32, 32) and s.test_x.shape == (10_000, 3, 32, 32)
    assert s.train_x.dtype == torch.uint8 and s.train_y.dtype == torch.int64
    assert int(s.train_y.min()) == 0 and int(s.train_y.max()) == 9
    assert torch.bincount(s.train_y).tolist() == [5000] * 10
    assert torch.bincount(s.test_y).tolist() == [1000] * 10
    assert s.class_names[0] == "airplane" and s.class_names[9] == "truck"


@pytest.mark.cifar
def test_full_cifar10_through_gin_and_the_folder_itself(cifar10_root, cifar10_full):
    folder = cifar10_root / "cifar-10-batches-py"
    gin.bind_parameter("CIFAR10.data_dir", str(folder))
    try:
        data = CIFAR10().load(num_clients=100, alpha=0.1, seed=0)
    finally:
        gin.clear_config()
    assert data.source == f"CIFAR-10 from {folder}"
    assert torch.equal(data.test_x[:50], cifar10_full.test_x[:50])
    assert [len(i) for i in data.client_train] == [500] * 100
    assert [len(i) for i in data.client_test] == [100] * 100


# ---------------------------------------------------------------- dirichlet_partition

def balanced_labels(n, num_classes=10):
    return torch.arange(n) % num_classes


def histograms(labels, parts, num_classes=10):
    return torch.stack([torch.bincount(labels[i], minlength=num_classes) for i in parts]).float()


def test_partition_sizes_disjointness_and_uniqueness():
    train, test = balanced_labels(10_000), balanced_labels(2_003)
    tr, te = dirichlet_partition(train, test, num_clients=7, alpha=0.1, seed=3, num_classes=10)
    assert [len(i) for i in tr] == [10_000 // 7] * 7 and [len(i) for i in te] == [2_003 // 7] * 7
    for parts, n in ((tr, 10_000), (te, 2_003)):
        assert all(i.dtype == torch.int64 for i in parts)
        everything = torch.cat(parts)
        assert len(torch.unique(everything)) == len(everything)  # unique within and disjoint across clients
        assert int(everything.min()) >= 0 and int(everything.max()) < n


def test_partition_is_seeded():
    train, test = balanced_labels(5_000), balanced_labels(1_000)
    a = dirichlet_partition(train, test, 10, 0.5, seed=1, num_classes=10)
    b = dirichlet_partition(train, test, 10, 0.5, seed=1, num_classes=10)
    c = dirichlet_partition(train, test, 10, 0.5, seed=2, num_classes=10)
    assert all(torch.equal(x, y) for x, y in zip(a[0] + a[1], b[0] + b[1]))
    assert not all(torch.equal(x, y) for x, y in zip(a[0], c[0]))


def test_small_alpha_skews_labels_and_large_alpha_is_near_uniform():
    train, test = balanced_labels(20_000), balanced_labels(4_000)
    tr, te = dirichlet_partition(train, test, 20, alpha=0.1, seed=0, num_classes=10)
    h = histograms(train, tr)
    assert (h.max(1).values / h.sum(1)).mean() > 0.5
    # The local test split follows the client's own label distribution, not the global one.
    ht = histograms(test, te)
    p, pt = h / h.sum(1, keepdim=True), ht / ht.sum(1, keepdim=True)
    assert 0.5 * (p - pt).abs().sum(1).mean() < 0.25
    tr, _ = dirichlet_partition(train, test, 20, alpha=1000.0, seed=0, num_classes=10)
    h = histograms(train, tr)
    # Mean, not max: the pools hold exactly 20 x 1,000 samples, so the last client takes what is left.
    assert (h.max(1).values / h.sum(1)).mean() < 0.15


def test_partition_when_preferred_classes_run_out():
    # Heavily imbalanced pools and many clients force the redistribution path; sizes must still hold.
    train = torch.cat([torch.zeros(900, dtype=torch.long), torch.arange(100) % 10])
    test = torch.cat([torch.zeros(90, dtype=torch.long), torch.arange(10)])
    tr, te = dirichlet_partition(train, test, 50, alpha=0.05, seed=0, num_classes=10)
    assert [len(i) for i in tr] == [20] * 50 and [len(i) for i in te] == [2] * 50
    assert len(torch.unique(torch.cat(tr))) == 1000 and len(torch.unique(torch.cat(te))) == 100


def test_one_sample_per_client_is_allowed():
    tr, te = dirichlet_partition(balanced_labels(30), balanced_labels(10), 30, 1.0, 0, 10)
    assert [len(i) for i in tr] == [1] * 30 and [len(i) for i in te] == [0] * 30


@pytest.mark.parametrize("kwargs,bad", [
    ({"alpha": 0.0}, "0.0"), ({"alpha": -1.0}, "-1.0"), ({"alpha": float("nan")}, "nan"),
    ({"alpha": float("inf")}, "inf"), ({"num_clients": 0}, "0"), ({"num_clients": 101}, "101"),
    ({"num_clients": 2.5}, "2.5"), ({"num_classes": 0}, "0"),
])
def test_partition_rejects_bad_values(kwargs, bad):
    args = {"num_clients": 5, "alpha": 0.5, "seed": 0, "num_classes": 10, **kwargs}
    with pytest.raises(ConfigError, match=bad):
        dirichlet_partition(balanced_labels(100), balanced_labels(20), **args)


def test_partition_rejects_labels_outside_num_classes():
    with pytest.raises(DataError, match="num_classes=5"):
        dirichlet_partition(balanced_labels(100), balanced_labels(20), 5, 0.5, 0, num_classes=5)


# ---------------------------------------------------------------- FederatedData and the gin entry points

def test_normalize_batch_and_to():
    data = CIFAR10().load(num_clients=4, alpha=1.0, seed=0)
    assert isinstance(data, FederatedData)
    assert data.mean.shape == (1, 3, 1, 1) and data.std.shape == (1, 3, 1, 1)
    assert data.mean.flatten().tolist() == pytest.approx(CIFAR_STATS.mean)
    x, y = data.batch(data.client_train[0][:16])
    assert x.dtype == torch.float32 and x.shape == (16, 3, 32, 32) and y.shape == (16,)
    expected = (data.train_x[data.client_train[0][:16]].float() / 255 - data.mean) / data.std
    assert torch.allclose(x, expected)
    xt, yt = data.batch(data.client_test[1], train=False)
    assert torch.equal(yt, data.test_y[data.client_test[1]]) and xt.shape[0] == len(yt)
    assert data.train_x.dtype == torch.uint8  # storage stays uint8
    moved = data.to("cpu")
    assert moved.source == data.source and len(moved.client_train) == 4
    with pytest.raises(TypeError):
        data.normalize(x)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_to_cuda_moves_every_tensor():
    data = CIFAR10().load(num_clients=4, alpha=1.0, seed=0).to("cuda")
    tensors = [data.train_x, data.train_y, data.test_x, data.test_y, data.mean, data.std,
               *data.client_train, *data.client_test]
    assert all(t.is_cuda for t in tensors)
    x, y = data.batch(data.client_train[0][:8])
    assert x.is_cuda and y.is_cuda


def test_cifar100_requires_data_dir_and_paths_are_validated():
    with pytest.raises(ConfigError, match="CIFAR100.data_dir is required"):
        CIFAR100()
    with pytest.raises(ConfigError, match="must be a path"):
        CIFAR10(data_dir=5)


def test_constructors_do_not_load(tmp_path):
    source = CIFAR10(data_dir=str(tmp_path / "later"))  # nothing there yet: only load() looks
    with pytest.raises(DataError, match="no CIFAR-10 found"):
        source.load(num_clients=2, alpha=0.5, seed=0)
