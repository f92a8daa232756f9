"""The MLflow store: which one (``--tracking-uri``), whether it can be created, and the lock that keeps its
creation safe against other processes. Importing this module does not import mlflow, so the command line can
check ``--tracking-uri`` before anything heavy is loaded."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from fl_sparse.core.errors import FlSparseError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class TrackingError(FlSparseError):
    """The MLflow store could not be created, opened or written. Checkpoints are written only after a
    round is logged, so the run's checkpoints stay consistent and ``--resume`` continues it."""


def tracking_uri(cli_value: str | None) -> str:
    """--tracking-uri wins, then MLFLOW_TRACKING_URI, then a sqlite file in the working directory.

    A relative sqlite path is made absolute: MLflow caches stores by URI, so a relative one would keep
    pointing at the first working directory it was used from."""
    uri = cli_value or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix):].startswith("/"):
        uri = prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///PATH`` URI (None for other stores and in-memory sqlite)."""
    prefix = "sqlite:///"
    path = uri[len(prefix):].split("?")[0] if uri.startswith(prefix) else ""
    return Path(path) if path and path != ":memory:" else None


def check_tracking_uri(cli_value: str | None) -> None:
    """Reject a local store that cannot be created before anything is built: a database path that is a
    directory, or a path below a file or an unwritable directory (MLflow creates missing directories).
    Remote stores are MLflow's to check."""
    uri = tracking_uri(cli_value)
    source = "--tracking-uri" if cli_value else ("MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI")
                                                 else "the default tracking URI")
    database = sqlite_file(uri)
    if database is not None:
        if database.is_dir():
            raise TrackingError(f"{source} {uri}: {database} is a directory; give the path of a database file")
        folder = database.parent
    elif "://" not in uri or uri.startswith("file:"):  # MLflow's file store: a directory
        folder = Path(uri.removeprefix("file://").removeprefix("file:")).resolve()
    else:
        return
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise TrackingError(f"{source} {uri}: {existing} is a file, not a directory; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise TrackingError(f"{source} {uri}: the directory {existing} is not writable; choose another path")


@contextlib.contextmanager
def store_lock(uri: str):
    """Hold ``<database>.lock`` while MLflow creates, migrates or first opens a sqlite store: MLflow's schema
    migration is not safe against other processes (four runs started together leave the store
    half-migrated). The lock is released when the file is closed, also when the process dies."""
    database = sqlite_file(uri)
    if database is None:
        yield
        return
    import fcntl

    lock = Path(f"{database}.lock")
    try:
        database.parent.mkdir(parents=True, exist_ok=True)  # as MLflow would, but the lock comes first
        handle = open(lock, "a")
    except OSError as error:
        raise TrackingError(f"cannot create {lock} beside the MLflow store: {error.strerror}; "
                            "make its directory writable or choose another --tracking-uri") from None
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:  # e.g. a network file system without locks
            raise TrackingError(f"cannot lock {lock}: {error.strerror}; put the sqlite store on a local "
                                "disk or use a tracking server") from None
        yield
