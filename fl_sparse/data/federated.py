"""A dataset split over federated clients: Dirichlet label skew, uint8 storage, per-batch normalisation.

Images stay uint8 in memory (and on the GPU): 50,000 CIFAR images are 150 MB as uint8 but 600 MB as
float32, and normalising a batch on the fly costs next to nothing. Clients hold index tensors into the
shared train / test arrays, never copies.

Gin entry points (constructors only store and validate; ``load`` reads the data)::

    CIFAR10.data_dir = None           # None: the embedded 2,000 / 500 image subset shipped in the package
    CIFAR100.data_dir = '/data'       # required: no CIFAR-100 subset ships
    data = CIFAR10().load(num_clients=20, alpha=0.1, seed=0)   # -> FederatedData
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import NamedTuple

import gin
import numpy as np
import torch

from fl_sparse.core.errors import ConfigError, DataError
from fl_sparse.data.cifar import CifarSplits, load_cifar10, load_cifar100, load_embedded_cifar10


class Stats(NamedTuple):
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# The constants of FedDST and the sparse-FL code it builds on, kept so accuracies stay comparable. The
# "std" is not the per-pixel std of CIFAR-10 (that is about 0.247, 0.243, 0.261) but the figure those
# repositories use. CIFAR-100 deliberately uses the same constants, as those repositories do.
CIFAR_STATS = Stats(mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010))


def _take_counts(n: int, q: np.ndarray, available: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-class counts summing to ``n``, drawn from ``q`` and capped by ``available``.

    What a capped class cannot give is redrawn over the classes that still have samples, in proportion
    to ``q`` (or to what is left, when the client puts no weight on any of them). Each pass takes at
    least one sample, so the loop ends; in practice it runs a handful of times.
    """
    counts = np.minimum(rng.multinomial(n, q), available)
    while (missing := n - counts.sum()) > 0:
        room = available - counts
        weights = np.where(room > 0, q, 0.0)
        if weights.sum() <= 0:
            weights = room.astype(np.float64)
        counts += np.minimum(rng.multinomial(missing, weights / weights.sum()), room)
    return counts


def _class_pools(labels: np.ndarray, num_classes: int, rng: np.random.Generator) -> list[np.ndarray]:
    return [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]


def _check_labels(labels: np.ndarray, num_classes: int, what: str) -> None:
    if labels.ndim != 1:
        raise DataError(f"{what} labels have shape {labels.shape}, expected a 1-d tensor")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{what} labels span [{labels.min()}, {labels.max()}], outside num_classes={num_classes}")


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def dirichlet_partition(train_labels: torch.Tensor, test_labels: torch.Tensor, num_clients: int, alpha: float,
                        seed: int, num_classes: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Balanced-size Dirichlet label skew, as in FedDST.

    Every client gets ``len(train) // num_clients`` train and ``len(test) // num_clients`` local-test
    samples, without replacement (clients are disjoint). Client c's label proportions are
    ``q_c ~ Dirichlet(alpha * ones(num_classes))``; its per-class counts are drawn from ``q_c`` and taken
    from shuffled per-class pools, with exhausted classes' share redrawn over the remaining classes in
    proportion to ``q_c``. The local test split uses the same ``q_c`` on the test pools, so it follows
    the client's label distribution. Small alpha: few classes per client; large alpha: near uniform.
    Returns sorted int64 index tensors (train, test), one per client.
    """
    train = np.asarray(torch.as_tensor(train_labels).cpu(), dtype=np.int64)
    test = np.asarray(torch.as_tensor(test_labels).cpu(), dtype=np.int64)
    if not _is_int(num_classes) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
    _check_labels(train, num_classes, "train")
    _check_labels(test, num_classes, "test")
    if not _is_int(num_clients) or not 1 <= num_clients <= len(train):
        raise ConfigError(f"num_clients must be an integer in [1, {len(train)}] (the number of training "
                          f"samples), got {num_clients!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not (alpha > 0 and math.isfinite(alpha)):
        raise ConfigError(f"alpha (Dirichlet concentration) must be a finite number > 0, got {alpha!r}")

    num_clients, num_classes = int(num_clients), int(num_classes)
    rng = np.random.default_rng(seed)
    pools = {"train": _class_pools(train, num_classes, rng), "test": _class_pools(test, num_classes, rng)}
    used = {split: np.zeros(num_classes, dtype=np.int64) for split in pools}  # next free slot per pool
    size = {"train": len(train) // num_clients, "test": len(test) // num_clients}
    out: dict[str, list[torch.Tensor]] = {"train": [], "test": []}
    for _ in range(num_clients):
        q = rng.dirichlet(np.full(num_classes, float(alpha)))
        if not np.all(np.isfinite(q)) or q.sum() <= 0:  # underflow at tiny alpha: all mass on one class
            q = np.eye(num_classes)[rng.integers(num_classes)]
        for split, split_pools in pools.items():
            available = np.array([len(p) for p in split_pools]) - used[split]
            counts = _take_counts(size[split], q, available, rng)
            taken = [split_pools[c][used[split][c]:used[split][c] + counts[c]] for c in np.flatnonzero(counts)]
            used[split] += counts
            idx = np.sort(np.concatenate(taken)) if taken else np.zeros(0, dtype=np.int64)
            out[split].append(torch.from_numpy(idx.astype(np.int64)))
    return out["train"], out["test"]


@dataclasses.dataclass
class FederatedData:
    """Shared uint8 images, labels and each client's indices into them.

    ``client_train[c]`` / ``client_test[c]`` index ``train_x`` / ``test_x``; ``test_x`` as a whole is the
    global test set. Normalise with :meth:`normalize` (or :meth:`batch`) per batch.
    """

    train_x: torch.Tensor  # uint8 [N, 3, 32, 32]
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor
    test_y: torch.Tensor
    client_train: list[torch.Tensor]
    client_test: list[torch.Tensor]
    num_classes: int
    source: str  # for logs, e.g. "embedded CIFAR-10 subset (2000 train / 500 test images)"
    mean: torch.Tensor  # float32 [1, 3, 1, 1]
    std: torch.Tensor

    @property
    def num_clients(self) -> int:
        return len(self.client_train)

    def to(self, device: torch.device | str) -> FederatedData:
        """A copy with every tensor (images, labels, client indices, stats) on ``device``."""
        move = lambda t: t.to(device)  # noqa: E731
        return dataclasses.replace(
            self, train_x=move(self.train_x), train_y=move(self.train_y), test_x=move(self.test_x),
            test_y=move(self.test_y), client_train=[move(i) for i in self.client_train],
            client_test=[move(i) for i in self.client_test], mean=move(self.mean), std=move(self.std))

    def normalize(self, x_uint8: torch.Tensor) -> torch.Tensor:
        """``(x / 255 - mean) / std`` as float32, on ``x``'s device."""
        if x_uint8.dtype != torch.uint8:
            raise TypeError(f"normalize expects uint8 images, got {x_uint8.dtype}")
        mean, std = self.mean.to(x_uint8.device), self.std.to(x_uint8.device)
        return (x_uint8.to(torch.float32).div_(255.0) - mean).div_(std)

    def batch(self, indices: torch.Tensor, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised images and labels of ``indices`` from the train (default) or the test split."""
        x, y = (self.train_x, self.train_y) if train else (self.test_x, self.test_y)
        indices = indices.to(x.device)
        return self.normalize(x[indices]), y[indices]


def federate(splits: CifarSplits, source: str, num_clients: int, alpha: float, seed: int,
             stats: Stats = CIFAR_STATS) -> FederatedData:
    """Partition loaded splits over clients (see :func:`dirichlet_partition`)."""
    client_train, client_test = dirichlet_partition(splits.train_y, splits.test_y, num_clients, alpha, seed,
                                                    splits.num_classes)
    return FederatedData(splits.train_x, splits.train_y, splits.test_x, splits.test_y, client_train, client_test,
                         splits.num_classes, source, torch.tensor(stats.mean).view(1, 3, 1, 1),
                         torch.tensor(stats.std).view(1, 3, 1, 1))


def _check_data_dir(name: str, data_dir, required: bool) -> str | None:
    if data_dir is None or data_dir == "":
        if required:
            raise ConfigError(f"{name}.data_dir is required (no embedded {name} subset ships): bind "
                              f"{name}.data_dir = '/path/to/data' or pass --data-dir")
        return None
    if not isinstance(data_dir, (str, os.PathLike)):
        raise ConfigError(f"{name}.data_dir must be a path string or None, got {data_dir!r}")
    return os.fspath(data_dir)


@gin.configurable
class CIFAR10:
    """CIFAR-10 from ``data_dir`` (root with ``cifar-10-batches-py`` or that folder), or, with
    ``data_dir=None``, the embedded class-balanced subset (2,000 train / 500 test real images)."""

    def __init__(self, data_dir: str | None = None):
        self.data_dir = _check_data_dir("CIFAR10", data_dir, required=False)

    def load(self, num_clients: int, alpha: float, seed: int) -> FederatedData:
        if self.data_dir is None:
            splits = load_embedded_cifar10()
            source = f"embedded CIFAR-10 subset ({len(splits.train_y)} train / {len(splits.test_y)} test images)"
        else:
            splits = load_cifar10(self.data_dir)
            source = f"CIFAR-10 from {splits.path}"
        return federate(splits, source, num_clients, alpha, seed)


@gin.configurable
class CIFAR100:
    """CIFAR-100 (fine labels) from ``data_dir`` (root with ``cifar-100-python`` or that folder); required."""

    def __init__(self, data_dir: str | None = None):
        self.data_dir = _check_data_dir("CIFAR100", data_dir, required=True)

    def load(self, num_clients: int, alpha: float, seed: int) -> FederatedData:
        splits = load_cifar100(self.data_dir)
        return federate(splits, f"CIFAR-100 from {splits.path}", num_clients, alpha, seed)
