"""How a dataset is split over clients: a partitioner maps (train labels, test labels, clients, alpha, seed) to
each client's train and local-test indices. ``CIFAR10.partition`` / ``CIFAR100.partition`` choose one.

* :class:`BalancedDirichlet` (the default): every client the same number of samples, Dirichlet label
  proportions per client (:func:`fl_sparse.data.federated.dirichlet_partition`).
* :class:`PerClassDirichlet`: the FedDST and PFFDST authors' split (``bibikar/feddst`` ``datasets.py:9-54``):
  each class is cut over the clients by Dirichlet(alpha) proportions, so clients differ in size as much as
  in labels, and clients left without a train or a test sample are dropped.
"""

from __future__ import annotations

import math
import numbers

import gin
import numpy as np
import torch

from fl_sparse.core.errors import ConfigError, DataError

Split = tuple[list[torch.Tensor], list[torch.Tensor]]


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


class Partitioner:
    """Splits a dataset over ``num_clients`` clients; returns (train indices, local-test indices) per client,
    each a sorted int64 tensor. A partitioner may return fewer clients than asked (empty ones dropped)."""

    def split(self, train_labels: torch.Tensor, test_labels: torch.Tensor, num_clients: int, alpha: float,
              seed: int, num_classes: int) -> Split:
        raise NotImplementedError


@gin.configurable
class BalancedDirichlet(Partitioner):
    """Equal-size clients with Dirichlet(alpha) label proportions each (this library's default)."""

    def split(self, train_labels, test_labels, num_clients, alpha, seed, num_classes):
        return dirichlet_partition(train_labels, test_labels, num_clients, alpha, seed, num_classes)


@gin.configurable
class PerClassDirichlet(Partitioner):
    """The FedDST authors' split (``datasets.py:9-54``, ``distribute_clients_dirichlet``).

    ``p ~ Dirichlet(alpha * ones(num_clients))`` is drawn once per class (``p[class, client]``). The samples of
    each class, in ``np.argsort(labels)`` order, are cut into consecutive slices of sizes
    ``floor(cumsum(count_c * p[c]))`` differences (their ``uint64`` cast), client 0 first, the last slice ending
    at the class's end; the local test split applies the same ``p`` to the test set. Clients whose train or
    test split is empty are dropped, as the authors' loader does (``datasets.py:169-171``), so fewer than
    ``num_clients`` clients remain (385-394 of 400 on CIFAR-10 at alpha = 0.1). Their shuffle of each client's
    indices only orders batches, which here come from the keyed batch stream, so it is left out.
    """

    def split(self, train_labels, test_labels, num_clients, alpha, seed, num_classes):
        if not isinstance(num_clients, int) or num_clients < 1:
            raise ConfigError(f"num_clients must be a positive integer, got {num_clients!r}")
        rng = np.random.default_rng(seed)
        p = rng.dirichlet(np.full(num_clients, float(alpha)), size=num_classes)
        train = _per_class_slices(np.asarray(torch.as_tensor(train_labels).cpu()), p, num_classes)
        test = _per_class_slices(np.asarray(torch.as_tensor(test_labels).cpu()), p, num_classes)
        kept = [client for client in range(num_clients) if len(train[client]) and len(test[client])]
        if not kept:
            raise ConfigError(f"PerClassDirichlet left every one of {num_clients} clients without data; "
                              "use fewer clients or a larger Experiment.dirichlet_alpha")
        return [train[c] for c in kept], [test[c] for c in kept]


def _per_class_slices(labels: np.ndarray, p: np.ndarray, num_classes: int) -> list[torch.Tensor]:
    """Each client's indices: per class, the slice of the class-sorted indices that ``p`` gives it."""
    counts = np.bincount(labels, minlength=num_classes)
    order = np.argsort(labels)  # numpy's default sort, as the authors' code: it fixes which sample goes where
    starts = np.cumsum(counts) - counts
    offsets = np.cumsum(counts[:, None] * p, axis=1).astype(np.uint64) + starts[:, None].astype(np.uint64)
    offsets = np.concatenate([offsets, np.cumsum(counts)[:, None].astype(np.uint64)], axis=1)
    clients = []
    for client in range(p.shape[1]):
        pieces = [order[int(lo):int(hi)] for lo, hi in offsets[:, client:client + 2]]
        clients.append(torch.from_numpy(np.sort(np.concatenate(pieces)).astype(np.int64)))
    return clients
