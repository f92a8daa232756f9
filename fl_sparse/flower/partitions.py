"""Per-node data: each client's partition in its own folder, so that a SuperNode holds only its own data.

``fl-sparse flower partition`` splits the data set exactly as every process of a run splits it
(:meth:`fl_sparse.engine.experiment.Experiment.load_data`) and writes one folder per client::

    OUT/partition-0003/train.npz       images (uint8 [n, 3, 32, 32]) and labels (int64 [n]) of client 3's
                                       training samples, in the order of its index tensor; no pickle
    OUT/partition-0003/manifest.json   partition index, sample count, label histogram, the SHA-256 of the
                                       arrays, the split (dataset, clients, alpha, seed, partitioner) and the
                                       composition it was made from

A SuperNode started with ``--node-config "data-path='OUT/partition-0003'"`` loads that folder and nothing
else (:func:`load_partition`); it tells the server its partition and digest, and the server, which splits the
whole data set itself, refuses a node whose digest is not that of its own partition ``3``.

This module imports torch only where tensors are made: a query's ClientApp process reads the manifest alone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Mapping

import numpy as np

from fl_sparse.core.errors import ConfigError, DataError

if TYPE_CHECKING:
    from fl_sparse.data import FederatedData
    from fl_sparse.engine.experiment import Experiment

FORMAT = "fl_sparse.partition/1"
MANIFEST, ARRAYS = "manifest.json", "train.npz"
MANIFEST_KEYS = {"format", "partition", "num_partitions", "num_samples", "num_classes", "label_histogram", "sha256",
                 "mean", "std", "split", "source", "composition"}


def data_path(node_config: Mapping) -> str | None:
    """The folder of this SuperNode's own data (node config ``data-path``), or None: it splits the whole data set."""
    path = node_config.get("data-path")
    if path is not None and (not isinstance(path, str) or not path):
        raise ConfigError(f"node config data-path={path!r}: give the folder that fl-sparse flower partition wrote "
                          "for this node, e.g. --node-config \"data-path='/data/partition-0003'\"")
    return path


def node_partition(node_config: Mapping, num_clients: int | None = None) -> tuple[int, str | None]:
    """A SuperNode's partition and, when it holds only its own data (``data-path``), that data's digest."""
    path = data_path(node_config)
    if path is None:
        return partition_id(node_config, num_clients), None
    manifest = read_manifest(Path(path))
    declared = node_config.get("partition-id")
    if declared is not None and declared != manifest["partition"]:
        raise ConfigError(f"node config partition-id={declared!r}, but data-path {path} holds partition "
                          f"{manifest['partition']}; drop partition-id, the folder names the partition")
    return manifest["partition"], manifest["sha256"]


def partition_id(node_config: Mapping, num_clients: int | None = None) -> int:
    """A SuperNode's partition, from its node config (checked against ``num_clients`` when given)."""
    value = node_config.get("partition-id")
    if (isinstance(value, bool) or not isinstance(value, int) or value < 0
            or (num_clients is not None and value >= num_clients)):
        raise ConfigError(f"node config partition-id={value!r}: start the SuperNode with --node-config "
                          f"'partition-id=K' for a K in [0, Experiment.num_clients)")
    return value


def folder_name(partition: int) -> str:
    return f"partition-{partition:04d}"


def digest(images: np.ndarray, labels: np.ndarray) -> str:
    """SHA-256 of a partition's content: image shape, image bytes (uint8) and labels (int64, little-endian)."""
    content = hashlib.sha256(json.dumps(list(images.shape)).encode())
    content.update(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
    content.update(np.ascontiguousarray(labels, dtype="<i8").tobytes())
    return content.hexdigest()


def client_digest(data: FederatedData, client: int) -> str:
    """The digest of ``client``'s training samples in ``data`` (what its partition folder must hold)."""
    indices = data.client_train[client].cpu()
    return digest(data.train_x.cpu()[indices].numpy(), data.train_y.cpu()[indices].numpy())


def split_identity(experiment: Experiment) -> dict:
    """What decides the split: two experiments with equal identities give every client the same samples."""
    return {"dataset": type(experiment.dataset).__name__, "num_clients": experiment.num_clients,
            "dirichlet_alpha": experiment.dirichlet_alpha, "partition_seed": experiment.stream_seed("partition"),
            "partitioner": type(experiment.dataset.partition).__name__}


def write_partitions(experiment: Experiment, data: FederatedData, composition: dict, out: Path) -> list[Path]:
    """One folder per client of ``data`` (``experiment``'s split) under ``out``, which must be empty or absent."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out}: exists and is not an empty directory; give a new one, so that no stale "
                          "partition is mixed in")
    folders = []
    for client in range(data.num_clients):
        indices = data.client_train[client].cpu()
        images, labels = data.train_x.cpu()[indices].numpy(), data.train_y.cpu()[indices].numpy().astype("<i8")
        folder = out / folder_name(client)
        folder.mkdir(parents=True)
        np.savez(folder / ARRAYS, images=images, labels=labels)
        manifest = {"format": FORMAT, "partition": client, "num_partitions": data.num_clients,
                    "num_samples": len(labels), "num_classes": data.num_classes,
                    "label_histogram": np.bincount(labels, minlength=data.num_classes).tolist(),
                    "sha256": digest(images, labels), "mean": data.mean.flatten().tolist(),
                    "std": data.std.flatten().tolist(), "split": split_identity(experiment), "source": data.source,
                    "composition": composition}
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        folders.append(folder)
    return folders


def read_manifest(folder: Path) -> dict:
    """The manifest of a partition folder; :class:`DataError` if it is missing or not ours."""
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"data-path {folder}: cannot read {MANIFEST} ({type(error).__name__}: {error}); give a "
                        "folder written by fl-sparse flower partition") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or set(manifest) != MANIFEST_KEYS:
        raise DataError(f"data-path {folder}: {MANIFEST} is not an {FORMAT} manifest; write the folder with "
                        "this version's fl-sparse flower partition")
    return manifest


def load_partition(folder: Path, experiment: Experiment) -> FederatedData:
    """The data of the node that holds partition ``folder``: only its own samples, as the partition's client of
    ``experiment``'s split (the other clients hold none). Reads nothing but ``folder``."""
    import torch

    from fl_sparse.data import FederatedData

    manifest = read_manifest(folder)
    expected = split_identity(experiment)
    if manifest["split"] != expected:
        raise ConfigError(f"data-path {folder} holds a partition of the split {manifest['split']}, but this run "
                          f"splits {expected}; re-run fl-sparse flower partition with the run's presets and bindings")
    try:
        with np.load(Path(folder) / ARRAYS, allow_pickle=False) as arrays:
            images, labels = arrays["images"], arrays["labels"]
    except (OSError, KeyError, ValueError) as error:
        raise DataError(f"data-path {folder}: cannot read {ARRAYS} ({type(error).__name__}: {error})") from None
    if images.dtype != np.uint8 or labels.dtype != np.dtype("<i8") or digest(images, labels) != manifest["sha256"]:
        raise DataError(f"data-path {folder}: {ARRAYS} does not match the SHA-256 in {MANIFEST}; write it again "
                        "with fl-sparse flower partition")
    none = torch.zeros(0, dtype=torch.int64)  # the other clients' samples, and the test set: the server's
    client_train = [none] * manifest["num_partitions"]
    client_train[manifest["partition"]] = torch.arange(len(labels))
    stats = [torch.tensor(manifest[key]).view(1, -1, 1, 1) for key in ("mean", "std")]
    return FederatedData(torch.from_numpy(images), torch.from_numpy(labels),
                         torch.zeros((0, *images.shape[1:]), dtype=torch.uint8), none, client_train,
                         [none] * manifest["num_partitions"], manifest["num_classes"],
                         f"partition {manifest['partition']} from {folder}", *stats)
