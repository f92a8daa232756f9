"""Shared fixtures. The full CIFAR-10 copy lives outside the repository, in ``../shared/data``; tests that
need it are marked ``cifar`` and skip cleanly where it is absent (users outside this workplace)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
PREPARE_CIFAR10 = SHARED / "data" / "prepare_cifar10.py"


def pytest_configure(config):
    config.addinivalue_line("markers", "cifar: needs ../shared/data (the full CIFAR-10 copy)")


@pytest.fixture(scope="session")
def cifar10_root(tmp_path_factory) -> Path:
    """A root holding ``cifar-10-batches-py`` with all 60,000 images, prepared once per session (~10 s)."""
    if not PREPARE_CIFAR10.is_file():
        pytest.skip("../shared/data is absent: the full CIFAR-10 tests need it (see README)")
    root = tmp_path_factory.mktemp("cifar10_root")
    done = subprocess.run([sys.executable, str(PREPARE_CIFAR10), "--out", str(root)],
                          capture_output=True, text=True)
    if done.returncode != 0:  # the data is there but could not be unpacked: a real failure, not a skip
        pytest.fail(f"{PREPARE_CIFAR10} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    return root


@pytest.fixture(autouse=True)
def fresh_gin_config():
    """Each test starts from an empty, unlocked gin config (parsing a config locks it) and no tracking URI."""
    import os

    import gin

    gin.clear_config()
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI, which would leak one test's store into the next.
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    gin.clear_config()
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module that trains: the results compared do not depend on it, and on a shared
    2-core machine two OpenMP threads slow down several-fold whenever another process is busy
    (docs/benchmarks.md). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def task_identity():
    """Flower stamps each Message with the identity of the process's task, which its runtime sets."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = saved
