"""A dataset split over federated clients (:mod:`fl_sparse.data.partitions`), uint8 storage, per-batch normalisation.

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
import os
from typing import NamedTuple

import gin
import torch

from fl_sparse.core.errors import ConfigError
from fl_sparse.data.cifar import CifarSplits, load_cifar10, load_cifar100, load_embedded_cifar10
from fl_sparse.data.partitions import BalancedDirichlet, Partitioner, dirichlet_partition  # noqa: F401


class Stats(NamedTuple):
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


# The constants of FedDST and the sparse-FL code it builds on, kept so accuracies stay comparable. The
# "std" is not the per-pixel std of CIFAR-10 (that is about 0.247, 0.243, 0.261) but the figure those
# repositories use. CIFAR-100 deliberately uses the same constants, as those repositories do.
CIFAR_STATS = Stats(mean=(0.4914, 0.4822, 0.4465), std=(0.2023, 0.1994, 0.2010))


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
             stats: Stats = CIFAR_STATS, partition: Partitioner | None = None) -> FederatedData:
    """Partition loaded splits over clients (default: :func:`dirichlet_partition`)."""
    client_train, client_test = (partition or BalancedDirichlet()).split(splits.train_y, splits.test_y,
                                                                         num_clients, alpha, seed, splits.num_classes)
    return FederatedData(splits.train_x, splits.train_y, splits.test_x, splits.test_y, client_train, client_test,
                         splits.num_classes, source, torch.tensor(stats.mean).view(1, 3, 1, 1),
                         torch.tensor(stats.std).view(1, 3, 1, 1))


def _check_partition(name: str, partition) -> Partitioner:
    if partition is None:
        return BalancedDirichlet()
    if not isinstance(partition, Partitioner):
        raise ConfigError(f"{name}.partition={partition!r} must be a partitioner, e.g. @PerClassDirichlet()")
    return partition


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

    def __init__(self, data_dir: str | None = None, partition: Partitioner | None = None):
        self.data_dir = _check_data_dir("CIFAR10", data_dir, required=False)
        self.partition = _check_partition("CIFAR10", partition)

    def load(self, num_clients: int, alpha: float, seed: int) -> FederatedData:
        if self.data_dir is None:
            splits = load_embedded_cifar10()
            source = f"embedded CIFAR-10 subset ({len(splits.train_y)} train / {len(splits.test_y)} test images)"
        else:
            splits = load_cifar10(self.data_dir)
            source = f"CIFAR-10 from {splits.path}"
        return federate(splits, source, num_clients, alpha, seed, partition=self.partition)


@gin.configurable
class CIFAR100:
    """CIFAR-100 (fine labels) from ``data_dir`` (root with ``cifar-100-python`` or that folder); required."""

    def __init__(self, data_dir: str | None = None, partition: Partitioner | None = None):
        self.data_dir = _check_data_dir("CIFAR100", data_dir, required=True)
        self.partition = _check_partition("CIFAR100", partition)

    def load(self, num_clients: int, alpha: float, seed: int) -> FederatedData:
        splits = load_cifar100(self.data_dir)
        return federate(splits, f"CIFAR-100 from {splits.path}", num_clients, alpha, seed, partition=self.partition)
