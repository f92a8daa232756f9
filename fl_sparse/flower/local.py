"""``fl-sparse flower simulate``'s own Flower on this machine: a SuperLink and a SuperExec for one command.

``flwr run APP local`` starts flwr's managed local SuperLink (``flwr/cli/local_superlink.py``) detached, on fixed
ports (39091) of the shared ``$FLWR_HOME``, and leaves it running after the run. :class:`LocalFlower` starts the
same simulation SuperLink (``flower-superlink --simulation``) itself, on a free port of 127.0.0.1, with a private
``FLWR_HOME`` in a temporary folder, and in ``--isolation process`` mode, so that it also starts the SuperExec
(``flower-superexec``): the SuperExec's process group holds everything a run starts (``flwr-simulation``, the
ServerApp in it, Ray and its ClientApp actors). Stopping the two process groups stops all of it, when the run
ends and on Ctrl-C.

Their environment:

* ``RAY_worker_niceness=0``: Ray starts its workers at nice 15 otherwise, which starves them on a shared host
* ``RAY_ADDRESS=local``: Flower's ``ray.init()`` would join a Ray that ``ray start`` left running (named by
  ``RAY_ADDRESS`` or ``/tmp/ray/ray_current_cluster``); ``local`` always starts a Ray of its own
* ``FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.1``: the SuperExec picks the run up within 0.1 s, not Flower's 1 s
* ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``: fl_sparse is installed here; Flower would otherwise try to
  ``uv sync`` the app's dependencies. ``FLWR_DISABLE_UPDATE_CHECK=1``: no network call.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from fl_sparse.core.errors import FlSparseError

CONNECTION = "fl-sparse"  # the SuperLink connection in the private FLWR_HOME's config.toml
START_TIMEOUT_S = 60.0  # the SuperLink imports flwr and opens its database; slow on a loaded machine
STOP_TIMEOUT_S = 10.0  # SIGTERM first: flwr-simulation reports the run stopped and Ray shuts down


class FlowerStartError(FlSparseError):
    """The local SuperLink did not start."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class LocalFlower:
    """A private SuperLink and SuperExec, started on ``__enter__`` and stopped (with every process they started)
    on ``__exit__``. ``env``: more environment variables for them."""

    def __init__(self, env: dict[str, str] | None = None):
        self.scripts = Path(sys.executable).parent  # flwr, flower-superlink, flower-superexec of this environment
        self.extra_env = dict(env or {})
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> "LocalFlower":
        self.folder = tempfile.TemporaryDirectory(prefix="fl-sparse-flower-")
        home, port = Path(self.folder.name), free_port()
        (home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                          f'address = "127.0.0.1:{port}"\ninsecure = true\n')
        self.env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_worker_niceness": "0",
                    "RAY_ADDRESS": "local", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
                    "PATH": f"{self.scripts}{os.pathsep}{os.environ.get('PATH', '')}",
                    **self.extra_env}
        try:
            # --insecure: it listens on 127.0.0.1 only, for this command's flwr and SuperExec
            self._start("superlink", "flower-superlink", "--insecure", "--simulation", "--isolation", "process",
                        "--host", "127.0.0.1", "--port", str(port))
            self._wait_for_health(port)
            self._start("superexec", "flower-superexec", "--insecure", "--runtime-api-address", f"127.0.0.1:{port}")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self, name: str, program: str, *args: str) -> None:
        with open(Path(self.folder.name) / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
            self.processes.append(subprocess.Popen([str(self.scripts / program), *args], env=self.env, stdout=log,
                                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                                   start_new_session=True))  # its own group: Ctrl-C is ours

    def _wait_for_health(self, port: int) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            superlink = self.processes[0]
            if superlink.poll() is not None:
                raise FlowerStartError(f"flower-superlink exited with code {superlink.returncode}: {self._last_line()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise FlowerStartError(f"flower-superlink did not answer on 127.0.0.1:{port} within {START_TIMEOUT_S:.0f} s "
                               f"({self._last_line()}); is the machine overloaded?")

    def _last_line(self) -> str:
        lines = (Path(self.folder.name) / "superlink.log").read_text(errors="replace").strip().splitlines()
        return lines[-1] if lines else "no output"

    def flwr(self, *args: str, capture: bool = False) -> subprocess.CompletedProcess:
        """``flwr ARGS`` against this SuperLink (the connection is the private FLWR_HOME's default)."""
        return subprocess.run([str(self.scripts / "flwr"), *args], env=self.env, capture_output=capture, text=True)

    def last_run(self) -> dict:
        """``flwr ls --format json``'s entry of the run submitted last (this SuperLink serves this command only)."""
        done = self.flwr("ls", CONNECTION, "--format", "json", capture=True)
        try:
            return max(json.loads(done.stdout)["runs"], key=lambda run: run["pending-at"])
        except (ValueError, KeyError, TypeError) as error:
            raise FlSparseError(f"flwr ls did not list the run ({type(error).__name__}): "
                                f"{(done.stdout + done.stderr).strip()[-300:]}") from None

    def stop(self) -> None:
        """Stop the SuperExec's group (flwr-simulation, the ServerApp, Ray), then the SuperLink's; SIGKILL what is
        left after STOP_TIMEOUT_S. Removes the private FLWR_HOME."""
        for process in reversed(self.processes):
            signal_group(process.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            while _group_alive(process) and time.monotonic() < deadline:
                time.sleep(0.1)
            signal_group(process.pid, signal.SIGKILL)  # what ignored SIGTERM; the group's other members too
            process.wait()
        self.processes.clear()
        self.folder.cleanup()


def signal_group(pgid: int, sig: int) -> None:
    """Send ``sig`` to every process of group ``pgid``, if any is left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def _group_alive(leader: subprocess.Popen) -> bool:
    """Whether any process of ``leader``'s group is still running (the leader is reaped here)."""
    leader.poll()
    try:
        os.killpg(leader.pid, 0)
    except ProcessLookupError:
        return False
    return True
