"""Datasets for fl_sparse: CIFAR readers, the embedded CIFAR-10 subset and the federated (Dirichlet) split.

Entry points: the gin configurables :class:`CIFAR10` / :class:`CIFAR100`, whose ``load(num_clients,
alpha, seed)`` returns a :class:`FederatedData`.
"""

from fl_sparse.data.cifar import (
    EMBEDDED_SUBSET,
    CifarSplits,
    load_cifar10,
    load_cifar100,
    load_embedded_cifar10,
)
from fl_sparse.data.federated import (
    CIFAR10,
    CIFAR100,
    CIFAR_STATS,
    FederatedData,
    Stats,
    dirichlet_partition,
    federate,
)
from fl_sparse.data.partitions import BalancedDirichlet, Partitioner, PerClassDirichlet

__all__ = [
    "BalancedDirichlet",
    "Partitioner",
    "PerClassDirichlet",
    "CIFAR10",
    "CIFAR100",
    "CIFAR_STATS",
    "EMBEDDED_SUBSET",
    "CifarSplits",
    "FederatedData",
    "Stats",
    "dirichlet_partition",
    "federate",
    "load_cifar10",
    "load_cifar100",
    "load_embedded_cifar10",
]
