"""Read CIFAR-10 / CIFAR-100 from the official "python version" files, and the embedded subset.

The official release is a set of pickled dicts (``cifar-10-batches-py/data_batch_1..5``, ``test_batch``,
``batches.meta``; ``cifar-100-python/train``, ``test``, ``meta``). We read them directly instead of
through torchvision because torchvision insists on the official md5 sums, which locally re-encoded
copies (such as the one in ``../shared/data``) do not match. No checksum is verified here; the shapes
and label ranges are, so a wrong or truncated directory fails with one actionable line.

Pickles can run code when loaded, so the unpickler only resolves the few numpy names an array needs.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import pickle
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from fl_sparse.core.errors import DataError

CIFAR10_FOLDER = "cifar-10-batches-py"
CIFAR100_FOLDER = "cifar-100-python"
EMBEDDED_SUBSET = Path(__file__).resolve().parent / "embedded" / "cifar10_subset.npz"

# How a user gets the data; appended to every "not found" message.
CIFAR10_HINT = ("prepare it with `python ../shared/data/prepare_cifar10.py --out DIR` (or unpack the python version "
                "from https://www.cs.toronto.edu/~kriz/cifar.html into DIR), "
                "or omit --data-dir to use the embedded subset")
CIFAR100_HINT = "unpack the python version of CIFAR-100 from https://www.cs.toronto.edu/~kriz/cifar.html into DIR"


@dataclasses.dataclass
class CifarSplits:
    """One dataset in memory: uint8 images ``[N, 3, 32, 32]`` (channel-major RGB) and int64 labels."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int
    class_names: list[str]
    path: str  # the folder (or file) the arrays were read from


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Resolves only what a pickled numpy array needs; anything else is refused, not executed.

    Covers the official (Python 2) files and copies re-pickled by Python 3: protocol 2 spells bytes as
    ``_codecs.encode``, protocol 5 spells arrays as ``numpy._core.numeric._frombuffer``.
    """

    _ALLOWED = {
        ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR file")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):
            module = "numpy._core." + module[len("numpy.core."):]  # numpy 2 renamed it; the 2009 files use the old name
        return super().find_class(module, name)


def _read_pickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            obj = _ArrayOnlyUnpickler(fh, encoding="bytes").load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise DataError(f"cannot read {path}: {type(err).__name__}: {err}; the file is not a CIFAR python pickle "
                        "(truncated or wrong download?) - unpack the dataset again") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path} holds a {type(obj).__name__}, not the CIFAR dict; unpack the dataset again")
    return obj


def _get(batch: dict, key: str, path: Path):
    """Look ``key`` up as bytes (``encoding="bytes"``, the official files) or str (re-pickled copies)."""
    for k in (key.encode(), key):
        if k in batch:
            return batch[k]
    raise DataError(f"{path} has no '{key}' entry (keys: {sorted(map(str, batch))[:6]}); "
                    "is it the python version of the dataset?")


def _images_and_labels(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    batch = _read_pickle(path)
    data = np.asarray(_get(batch, "data", path))
    labels = np.asarray(_get(batch, label_key, path))
    n = data.shape[0] if data.ndim else 0
    if data.dtype != np.uint8 or data.shape[1:] not in ((3 * 32 * 32,), (3, 32, 32)):
        raise DataError(f"{path}: 'data' is {data.dtype} of shape {data.shape}, expected uint8 [N, 3072]; "
                        "unpack the dataset again")
    if labels.shape != (n,) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: '{label_key}' has shape {labels.shape} ({labels.dtype}), expected {n} integer "
                        "labels; unpack the dataset again")
    if n and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels span [{labels.min()}, {labels.max()}], expected [0, {num_classes - 1}]; "
                        "is this the right dataset?")
    return data.reshape(n, 3, 32, 32), labels.astype(np.int64)


def _find_folder(data_dir: str | os.PathLike, folder: str, probe: str, name: str, hint: str) -> Path:
    """Accept the root that contains ``folder`` or ``folder`` itself; say which path is wrong otherwise."""
    root = Path(data_dir).expanduser()
    for candidate in (root / folder, root):
        if (candidate / probe).is_file():
            return candidate
    if not root.is_dir():
        what = "is a file, not a directory" if root.exists() else "the directory does not exist"
        raise DataError(f"no {name} found at {root}: {what}; {hint}")
    raise DataError(f"no {name} found at {root}: expected {root / folder / probe}; {hint}")


def _require(folder: Path, files: list[str], name: str, hint: str) -> None:
    for f in files:
        if not (folder / f).is_file():
            raise DataError(f"incomplete {name} at {folder}: {folder / f} is missing; {hint}")


def _class_names(meta_path: Path, key: str, num_classes: int) -> list[str]:
    """Names from the meta file when present (it is optional: nothing else depends on it)."""
    if not meta_path.is_file():
        return [str(i) for i in range(num_classes)]
    names = [n.decode() if isinstance(n, bytes) else str(n) for n in _get(_read_pickle(meta_path), key, meta_path)]
    if len(names) != num_classes:
        raise DataError(f"{meta_path} lists {len(names)} class names, expected {num_classes}; unpack the dataset again")
    return names


def _release_freed_memory() -> None:
    """Hand the heap freed by unpickling back to the OS. glibc keeps freed chunks of this size in the heap,
    which left ~180 MB of dead batch copies in the RSS of every CIFAR-10 run; elsewhere this is a no-op."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _splits(train: Iterator[tuple[np.ndarray, np.ndarray]], test: tuple[np.ndarray, np.ndarray], num_classes: int,
            class_names: list[str], path: Path) -> CifarSplits:
    images, labels = zip(*train)  # reads the batches: the only references to them are here
    train_x, train_y = np.concatenate(images), np.concatenate(labels)  # one contiguous copy, owned by torch below
    del images, labels
    _release_freed_memory()
    return CifarSplits(torch.from_numpy(train_x), torch.from_numpy(train_y),
                       torch.from_numpy(np.ascontiguousarray(test[0])), torch.from_numpy(test[1]),
                       num_classes, class_names, str(path))


def load_cifar10(data_dir: str | os.PathLike) -> CifarSplits:
    """CIFAR-10 from ``data_dir`` (the root holding ``cifar-10-batches-py`` or that folder itself)."""
    folder = _find_folder(data_dir, CIFAR10_FOLDER, "data_batch_1", "CIFAR-10", CIFAR10_HINT)
    batches = [f"data_batch_{i}" for i in range(1, 6)]
    _require(folder, batches + ["test_batch"], "CIFAR-10", CIFAR10_HINT)
    train = (_images_and_labels(folder / b, "labels", 10) for b in batches)
    test = _images_and_labels(folder / "test_batch", "labels", 10)
    return _splits(train, test, 10, _class_names(folder / "batches.meta", "label_names", 10), folder)


def load_cifar100(data_dir: str | os.PathLike) -> CifarSplits:
    """CIFAR-100 (fine labels) from ``data_dir`` (the root holding ``cifar-100-python`` or that folder)."""
    folder = _find_folder(data_dir, CIFAR100_FOLDER, "train", "CIFAR-100", CIFAR100_HINT)
    _require(folder, ["train", "test"], "CIFAR-100", CIFAR100_HINT)
    train = iter([_images_and_labels(folder / "train", "fine_labels", 100)])
    test = _images_and_labels(folder / "test", "fine_labels", 100)
    return _splits(train, test, 100, _class_names(folder / "meta", "fine_label_names", 100), folder)


EMBEDDED_KEYS = ("train_x", "train_y", "test_x", "test_y")


def load_embedded_cifar10(path: str | os.PathLike = EMBEDDED_SUBSET) -> CifarSplits:
    """The class-balanced real CIFAR-10 subset shipped in the package (built by tools/make_embedded_subset.py)."""
    path = Path(path)
    fix = "reinstall fl_sparse or rebuild it with `python tools/make_embedded_subset.py --data-dir DIR`"
    if not path.is_file():
        raise DataError(f"the embedded CIFAR-10 subset is missing: expected {path}; {fix}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in EMBEDDED_KEYS}
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, RuntimeError, NotImplementedError) as err:
        # RuntimeError / NotImplementedError: a Python built without the lzma module the file needs.
        raise DataError(f"cannot read the embedded CIFAR-10 subset {path}: {err}; {fix}") from None
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (3, 32, 32) or y.shape != (x.shape[0],):
            raise DataError(f"{path}: {split} arrays have shapes {x.shape} / {y.shape}, expected [N, 3, 32, 32] "
                            f"uint8 and [N]; {fix}")
        if y.size and (y.min() < 0 or y.max() >= 10):
            raise DataError(f"{path}: {split} labels outside [0, 9]; {fix}")
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    return CifarSplits(torch.from_numpy(arrays["train_x"]), torch.from_numpy(arrays["train_y"].astype(np.int64)),
                       torch.from_numpy(arrays["test_x"]), torch.from_numpy(arrays["test_y"].astype(np.int64)),
                       10, names, str(path))
