#!/usr/bin/env python3
"""Build fl_sparse/data/embedded/cifar10_subset.npz, the real CIFAR-10 subset shipped in the package.

    python ../shared/data/prepare_cifar10.py --out /tmp/cifar_root      # once, ~10 s
    python tools/make_embedded_subset.py --data-dir /tmp/cifar_root

Takes the same number of images per class from the train and the test split (200 + 50 per class by
default: 2,000 train / 500 test), chosen by a seeded numpy Generator, so the run is deterministic. The
.npz is written with a fixed zip timestamp, so rebuilding from the same data gives the same bytes, and
its members are LZMA-compressed (np.load reads them through zipfile): 5.9 MB instead of deflate's 7.2 MB.
"""

from __future__ import annotations

import argparse
import io
import sys
import zipfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from fl_sparse.core.errors import DataError  # noqa: E402
from fl_sparse.data.cifar import EMBEDDED_SUBSET, load_cifar10  # noqa: E402


def balanced_indices(labels: np.ndarray, per_class: int, rng: np.random.Generator) -> np.ndarray:
    """``per_class`` distinct indices of every class, sorted so the file keeps the source order."""
    picks = []
    for c in range(int(labels.max()) + 1):
        pool = np.flatnonzero(labels == c)
        if len(pool) < per_class:
            raise SystemExit(f"class {c} has only {len(pool)} images, fewer than --*-per-class {per_class}")
        picks.append(rng.choice(pool, size=per_class, replace=False))
    return np.sort(np.concatenate(picks))


def write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez_compressed, but LZMA and with a fixed timestamp per member, so it is reproducible."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_LZMA) as zf:
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_LZMA
            zf.writestr(info, buf.getvalue())
    tmp.replace(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", required=True, help="root holding cifar-10-batches-py (or that folder)")
    ap.add_argument("--out", type=Path, default=EMBEDDED_SUBSET)
    ap.add_argument("--train-per-class", type=int, default=200)
    ap.add_argument("--test-per-class", type=int, default=50)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    try:
        full = load_cifar10(args.data_dir)
    except DataError as err:
        raise SystemExit(str(err)) from None
    rng = np.random.default_rng(args.seed)
    train_y, test_y = full.train_y.numpy(), full.test_y.numpy()
    tr = balanced_indices(train_y, args.train_per_class, rng)
    te = balanced_indices(test_y, args.test_per_class, rng)
    write_npz(args.out, {
        "train_x": full.train_x.numpy()[tr], "train_y": train_y[tr].astype(np.uint8),
        "test_x": full.test_x.numpy()[te], "test_y": test_y[te].astype(np.uint8),
    })
    print(f"wrote {args.out}: {len(tr)} train / {len(te)} test images, {args.out.stat().st_size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
