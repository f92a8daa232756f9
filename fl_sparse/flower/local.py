"""``fl-sparse flower simulate``'s own Flower on this machine: a SuperLink and a SuperExec for one command (and, for
tests and benchmarks, a loopback deployment: a SuperLink, SuperNodes and their node workers on 127.0.0.1).

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
    on ``__exit__``. ``env``: more environment variables for them (a ``PATH`` there comes after this environment's
    scripts).

    With ``supernodes`` (one ``--node-config`` string each), a loopback deployment instead: a deployment SuperLink
    (``--isolation subprocess``: it runs the ServerApp itself) and one ``flower-supernode`` per node config, all on
    127.0.0.1 without TLS; with ``workers`` (socket paths), a ``fl-sparse flower node-worker`` on each. Tests and
    benchmarks use it; a real deployment starts the same commands on its hosts (``docs/scale-out.md``)."""

    def __init__(self, env: dict[str, str] | None = None, supernodes: list[str] | None = None,
                 workers: list[str] = ()):
        self.scripts = Path(sys.executable).parent  # flwr, flower-superlink, flower-superexec of this environment
        self.extra_env = dict(env or {})
        self.supernodes, self.workers = supernodes, list(workers)
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> "LocalFlower":
        self.folder = tempfile.TemporaryDirectory(prefix="fl-sparse-flower-")
        home, port = Path(self.folder.name), free_port()
        (home / "config.toml").write_text(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
                                          f'address = "127.0.0.1:{port}"\ninsecure = true\n')
        self.env = {**os.environ, "FLWR_HOME": str(home), "FLWR_DISABLE_UPDATE_CHECK": "1",
                    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1", "RAY_worker_niceness": "0",
                    "RAY_ADDRESS": "local", "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.1",
                    **self.extra_env}
        # This environment's scripts first, also where the caller's env brings a PATH of its own: the SuperLink
        # starts flower-superexec and the SuperNodes flwr-clientapp by name, and another environment's would not
        # import this one's fl_sparse.
        self.env["PATH"] = f"{self.scripts}{os.pathsep}{self.env.get('PATH', '')}"
        try:
            if self.supernodes is None:
                # --insecure: it listens on 127.0.0.1 only, for this command's flwr and SuperExec
                self._start("superlink", "flower-superlink", "--insecure", "--simulation", "--isolation", "process",
                            "--host", "127.0.0.1", "--port", str(port))
                self._wait_for_health(port)
                self._start("superexec", "flower-superexec", "--insecure", "--runtime-api-address",
                            f"127.0.0.1:{port}")
            else:
                self._start_deployment(port)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start_deployment(self, port: int) -> None:
        """The SuperLink (all its APIs on ``port``), a node worker per socket, then a SuperNode per node config."""
        self._start("superlink", "flower-superlink", "--insecure", "--isolation", "subprocess", "--host", "127.0.0.1",
                    "--port", str(port), "--disable-runtime-dependency-installation")
        self._wait_for_health(port)
        for k, path in enumerate(self.workers):
            self._start(f"worker{k}", sys.executable, "-m", "fl_sparse.cli", "flower", "node-worker", "--socket", path)
        for k, node_config in enumerate(self.supernodes):
            self._start(f"supernode{k}", "flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{port}",
                        "--host", "127.0.0.1", "--port", str(free_port()), "--node-config", node_config)

    def log(self, name: str) -> Path:
        """The output of process ``name`` (superlink, superexec, supernode0, worker0, ...)."""
        return Path(self.folder.name) / f"{name}.log"

    def check_alive(self) -> None:
        """:class:`FlowerStartError` naming the first of this command's processes that has exited."""
        for process in self.processes:
            if process.poll() is not None:
                raise FlowerStartError(f"{Path(process.args[0]).name} {' '.join(process.args[1:4])} exited with "
                                       f"code {process.returncode}")

    def _start(self, name: str, program: str, *args: str) -> None:
        with open(self.log(name), "wb") as log:  # the child keeps its own descriptor
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
        """The SuperLink's first error line (uvicorn's last line only says that start-up failed), else its last."""
        lines = self.log("superlink").read_text(errors="replace").strip().splitlines()
        errors = [line for line in lines if "rror" in line and "startup failed" not in line]
        return (errors or lines or ["no output"])[0 if errors else -1]

    def flwr(self, *args: str, capture: bool = False) -> subprocess.CompletedProcess:
        """``flwr ARGS`` against this SuperLink (the connection is the private FLWR_HOME's default)."""
        return subprocess.run([str(self.scripts / "flwr"), *args], env=self.env, capture_output=capture, text=True)

    def run_to_end(self, app: Path, config: dict, timeout: float) -> dict:
        """``flwr run APP`` with ``config`` (run config keys and values), then poll its status every second until it
        finishes (:class:`FlSparseError` after ``timeout`` s, or when a process of this command exits); its
        ``flwr ls`` entry."""
        deadline = time.monotonic() + timeout
        from fl_sparse.flower.setup import toml_value

        overrides = [arg for key, value in config.items() for arg in ("-c", f"{key}={toml_value(value)}")]
        started = self._flwr_json("run", str(app), CONNECTION, *overrides)
        while time.monotonic() < deadline:
            [run] = self._flwr_json("ls", CONNECTION, "--run-id", str(started["run-id"]))["runs"]
            if run["status"].startswith("finished"):
                return run
            self.check_alive()
            time.sleep(1.0)
        raise FlSparseError(f"the Flower run {started['run-id']} did not finish within {timeout:.0f} s; logs in "
                            f"{self.folder.name}")

    def _flwr_json(self, *args: str) -> dict:
        done = self.flwr(*args, "--format", "json", capture=True)
        try:
            answer = json.loads(done.stdout)
        except ValueError:
            answer = {}
        if done.returncode != 0 or answer.get("success") is False:
            raise FlSparseError(f"flwr {args[0]} failed: {(done.stdout + done.stderr).strip()[-500:]}")
        return answer

    def last_run(self) -> dict:
        """``flwr ls --format json``'s entry of the run submitted last (this SuperLink serves this command only)."""
        done = self.flwr("ls", CONNECTION, "--format", "json", capture=True)
        try:
            return max(json.loads(done.stdout)["runs"], key=lambda run: run["pending-at"])
        except (ValueError, KeyError, TypeError) as error:
            raise FlSparseError(f"flwr ls did not list the run ({type(error).__name__}): "
                                f"{(done.stdout + done.stderr).strip()[-300:]}") from None

    def stop(self) -> None:
        """SIGTERM every process group this command started (the SuperExec's holds flwr-simulation, the ServerApp
        and Ray; a SuperNode's its SuperExec and ClientApps), newest first; SIGKILL what is left after
        STOP_TIMEOUT_S. Removes the private FLWR_HOME."""
        for process in reversed(self.processes):
            signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in reversed(self.processes):
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
