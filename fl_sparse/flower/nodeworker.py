"""``fl-sparse flower node-worker``: the long-lived process beside a SuperNode that trains its client.

Flower 1.42 starts a fresh ClientApp process for every message; one that imports torch, parses the composition
and loads the node's data before it trains pays seconds per message. The node worker pays that once: it imports
torch at start, builds the run's client side (:func:`fl_sparse.flower.setup.build_cached`: the composition, the
model and the node's data, ``data-path`` or the whole data set) on the first message of a run, and keeps it. The
ClientApp relays each train message to it over one Unix socket (protocol and byte layout:
:mod:`fl_sparse.flower.worker_wire`) and relays its update back.

The worker keeps each run's frozen part (:class:`fl_sparse.flower.client_side.FrozenMemory`) keyed by run id, for
the last :data:`RUNS_KEPT` runs, in memory and, as each new freeze version arrives, in a safetensors file in the
socket's private directory (no pickle), so that a worker restarted with the same ``--socket`` goes on with what
its client held: the server sends a frozen part once, and a client that lost it is refused until the next one.

Requests are served one at a time (a SuperNode handles one message at a time). Every refused or failed request
is answered with a one-line error, which the server logs as that client's rejection; the worker goes on.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import signal
import socket
import time
from pathlib import Path

from fl_sparse.core.errors import ConfigError, FlSparseError, PayloadError, first_line
from fl_sparse.flower import client_side, messages, partitions, setup, worker_wire

log = logging.getLogger(__name__)
RUNS_KEPT = 8  # runs whose frozen part the worker remembers
REQUEST_NUMBERS = {"run": int, **client_side.DOWNLINK_FIELDS}
REQUEST_KEYS = frozenset({"op", "run_config", "node_config"})
NODE_KEYS = frozenset({"data-path", "partition-id"})


class NodeWorker:
    """Serves train requests on the Unix socket ``path`` (its directory private to this user)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.memories: collections.OrderedDict[tuple[int, int], client_side.FrozenMemory] = collections.OrderedDict()
        self.listener: socket.socket | None = None

    def open(self) -> None:
        """Create the private directory if needed, refuse one that is not private or a live worker's socket, and
        listen."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        worker_wire.check_private_directory(self.path.parent)
        if self.path.exists() or self.path.is_symlink():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(str(self.path))
                except OSError:  # nobody listens: a stale socket of a worker that was killed
                    self.path.unlink()
                else:
                    raise ConfigError(f"--socket {self.path}: another node worker listens there; stop it or give "
                                      "another path")
        kept = sorted(self.path.parent.glob("frozen-run*.safetensors"), key=lambda f: f.stat().st_mtime)
        for stale in kept[:-RUNS_KEPT]:  # frozen parts of runs older than the last RUNS_KEPT
            stale.unlink()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self.listener.listen(4)

    def serve_forever(self) -> None:
        """Answer requests until SIGTERM or SIGINT; then remove the socket."""
        signal.signal(signal.SIGTERM, _stop)
        try:
            while True:
                connection, _ = self.listener.accept()
                with connection:
                    self.handle(connection)
        except (KeyboardInterrupt, SystemExit):
            pass
        finally:
            self.close()

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            self.path.unlink(missing_ok=True)

    def handle(self, connection: socket.socket) -> None:
        """One request on ``connection``: train and answer with the update, or answer with a one-line error."""
        request: dict = {}

        def payload_limit(header: dict) -> int:  # built before the payload is read, to bound it by the model
            request.update(self.parse(header))
            return request["built"].payload_limit

        try:
            try:
                header, downlink = worker_wire.read_frame(connection, payload_limit)
                answer, uplink = self.train(request, downlink)
            except FlSparseError as error:
                log.warning("node worker: request refused: %s", first_line(error))
                answer, uplink = {"ok": False, "error": first_line(error)}, b""
            except Exception as error:  # a bug or a broken environment: answered, logged in full, the worker goes on
                log.exception("node worker: request failed")
                answer, uplink = {"ok": False, "error": f"{type(error).__name__}: {first_line(error)}"}, b""
            worker_wire.write_frame(connection, answer, uplink)
        except OSError as error:  # the relay went away (its process was stopped); nothing to answer
            log.warning("node worker: the relay disconnected (%s)", error)

    def parse(self, header: dict) -> dict:
        """The request's numbers, node config and built client side; :class:`PayloadError` or
        :class:`ConfigError` for a header that is not a train request of a run this worker can build."""
        if header.get("op") != "train" or set(header) != REQUEST_KEYS | set(REQUEST_NUMBERS):
            raise PayloadError(f"a node worker request holds {sorted(REQUEST_KEYS | set(REQUEST_NUMBERS))}, got "
                               f"{sorted(header)[:20]}")
        numbers = messages.checked_numbers({key: header[key] for key in REQUEST_NUMBERS}, REQUEST_NUMBERS,
                                           where="request")
        run_config, node_config = header["run_config"], header["node_config"]
        if not isinstance(run_config, dict) or not isinstance(node_config, dict) or not set(node_config) <= NODE_KEYS:
            raise PayloadError(f"request run_config must be an object and node_config one with keys of "
                               f"{sorted(NODE_KEYS)}")
        started = time.perf_counter()
        threads = int(setup.settings(run_config)["threads"])
        built = setup.build_cached(setup.Composition.from_run_config(run_config), threads,
                                   partitions.data_path(node_config))
        client, _ = partitions.node_partition(node_config, built.server.experiment.num_clients)
        return {"numbers": numbers, "client": client, "built": built, "build_s": time.perf_counter() - started}

    def memory_file(self, key: tuple[int, int]) -> Path:
        return self.path.parent / f"frozen-run{key[0]}-client{key[1]}.safetensors"

    def recall(self, key: tuple[int, int]) -> client_side.FrozenMemory:
        """What the client of run ``key[0]`` held: from memory, else from the file an earlier worker on this socket
        wrote, else nothing (version 0)."""
        if key in self.memories:
            return self.memories[key]
        from safetensors.torch import safe_open

        try:
            with safe_open(str(self.memory_file(key)), framework="pt") as kept:
                tensors = {name: kept.get_tensor(name) for name in kept.keys()}
                version = int(kept.metadata()["version"])
        except FileNotFoundError:
            return client_side.FrozenMemory()
        except Exception as error:  # a torn or foreign file: as if nothing were kept, the server will refuse
            log.warning("node worker: ignoring %s (%s)", self.memory_file(key), first_line(error))
            return client_side.FrozenMemory()
        part = {kind: {name.split("/", 1)[1]: t for name, t in tensors.items() if name.startswith(kind + "/")}
                for kind in ("frozen", "values")}
        return client_side.FrozenMemory(version, part["frozen"], part["values"])

    def remember(self, key: tuple[int, int], memory: client_side.FrozenMemory,
                 held: client_side.FrozenMemory | None = None) -> None:
        """Keep ``memory`` for the run; write it to its file when its version is new against ``held``, what the
        client held before (default: :meth:`recall`). Written whole, then renamed into place, so a worker killed
        while writing leaves the previous file."""
        from safetensors.torch import save_file

        held = self.recall(key) if held is None else held
        if memory.version and memory.version != held.version:
            tensors = {**{f"frozen/{n}": t.contiguous() for n, t in memory.frozen.items()},
                       **{f"values/{n}": t.contiguous() for n, t in memory.values.items()}}
            partial = self.memory_file(key).with_suffix(".partial")
            save_file(tensors, str(partial), metadata={"version": str(memory.version)})
            os.replace(partial, self.memory_file(key))
        self.memories[key] = memory
        self.memories.move_to_end(key)
        while len(self.memories) > RUNS_KEPT:
            evicted, _ = self.memories.popitem(last=False)
            with contextlib.suppress(FileNotFoundError):
                self.memory_file(evicted).unlink()

    def train(self, request: dict, downlink: bytes) -> tuple[dict, bytes]:
        numbers, client, built = request["numbers"], request["client"], request["built"]
        key = (numbers.pop("run"), client)
        held = self.recall(key)
        trained = client_side.train_on_downlink(built, client, numbers, downlink, held)
        self.remember(key, trained.memory, held)
        seconds = {"build": request["build_s"], **trained.seconds}
        log.info("node worker: run %d round %d client %d: %s", key[0], numbers["round"], client,
                 " ".join(f"{name} {value:.3f} s" for name, value in seconds.items()))
        answer = {"ok": True, "round": numbers["round"], "client": client,
                  "num_samples": trained.result.num_samples, "train_loss": trained.result.train_loss,
                  "payload_limit": built.payload_limit, "seconds": seconds}
        return answer, trained.payload


def _stop(signum, frame):
    raise SystemExit(0)


def serve(path: Path, announce=lambda path: None) -> None:
    """Import the training stack, listen on ``path``, call ``announce(path)``, and answer until stopped."""
    import torch  # noqa: F401  (paid here, once, not by the first message)

    import fl_sparse.training.client  # noqa: F401

    worker = NodeWorker(path)
    worker.open()
    log.info("node worker: listening on %s (pid %d)", path, os.getpid())
    announce(path)
    worker.serve_forever()
