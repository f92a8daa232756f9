"""The Flower ServerApp: the engine's round, with Flower carrying the payloads to remote clients.

``main(grid, context)`` composes the Experiment from the run config (:mod:`fl_sparse.flower.setup`), asks
every SuperNode which partition it serves (a ``query`` message), then runs it with the same run path as
``fl-sparse run`` (:func:`fl_sparse.runtime.runner.run`: resume, checkpoints, the round loop and its stop
conditions), with :class:`FlowerRound` as the round's player: each round samples clients, encodes their
downlinks with our ``CommCodec`` (:meth:`~fl_sparse.engine.server.RoundServer.encode_downlinks`), pushes them
and pulls the replies every 0.1 s (:func:`exchange`), checks and decodes the replies
(:func:`fl_sparse.flower.messages.read_upload`, :meth:`~fl_sparse.engine.server.RoundServer.receive_uploads`) and
closes the round with the Aggregator,
FreezePolicy and MaskPolicy (:meth:`~fl_sparse.engine.server.RoundServer.close_round`). State, byte counts and
checkpoints are the engine's and the runtime's. A reply that is missing, late, an error, malformed, oversized or
not of the model is rejected
with a warning; the round aggregates the others.
"""

from __future__ import annotations

import json
import logging
import os
import time
import warnings
from pathlib import Path

from fl_sparse.flower import log_flower_lines_once, require_flwr

require_flwr()
log_flower_lines_once()

from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402

from fl_sparse.core.errors import ConfigError, PayloadError  # noqa: E402
from fl_sparse.core.state import RoundEvent, ServerState  # noqa: E402
from fl_sparse.engine.server import RoundServer  # noqa: E402
from fl_sparse.flower import messages, partitions, setup  # noqa: E402
from fl_sparse.parts.freezing import NoFreeze  # noqa: E402
from fl_sparse.runtime.callbacks import Callback  # noqa: E402
from fl_sparse.runtime.progress import ProgressBar  # noqa: E402
from fl_sparse.runtime.runner import run  # noqa: E402
from fl_sparse.tracking.store import tracking_uri  # noqa: E402
from fl_sparse.tracking.tracker import MlflowTracker  # noqa: E402

POLL_S = 0.1  # seconds between the server's pulls of replies
log = logging.getLogger("flwr")  # Flower's logger: the lines reach `flwr log` and the SuperLink's log
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = setup.settings(context.run_config)
    if config["resume"] and not config["checkpoint-dir"]:
        raise ConfigError("resume = true needs checkpoint-dir: the directory the interrupted run checkpointed into")
    built = setup.build(setup.Composition.from_run_config(context.run_config), int(config["threads"]))
    exp = built.composed.experiment
    if not isinstance(exp.freeze_policy, NoFreeze) and not exp.downlink_codec.carries_frozen_part:
        raise ConfigError(f"{type(exp.freeze_policy).__name__} freezes weights, but the downlink codec "
                          f"{exp.downlink_codec!r} cannot tell a remote client which; use "
                          "Experiment.downlink_codec = @FreezeAware()")
    server = FlowerRound(grid, built.server, built.payload_limit, float(config["round-timeout"]))
    server.discover(float(config["node-wait"]))
    directory = str(config["checkpoint-dir"]) or None
    if config["resume"]:
        log.info("fl_sparse: resuming from the newest checkpoint in %s", directory)
    progress = bool(config["progress"])
    # The bar comes first, as in fl-sparse run, so that it is closed before the tracker's end-of-run messages.
    callbacks = [ProgressBar()] if progress else []
    callbacks.append(MetricsLog(config["metrics-file"], logging.DEBUG if progress else logging.INFO))
    tracker = None
    uri = str(config["tracking-uri"]) or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:  # before the checkpointer, so that a checkpointed round is logged; resume continues its MLflow run
        tracker = MlflowTracker(tracking_uri(uri), str(config["experiment-name"]))
        callbacks.append(tracker)
    result = run(built.composed, callbacks, resume=directory if config["resume"] else None,
                 checkpoint_dir=directory, checkpoint_every=int(config["checkpoint-every"]) if directory else None,
                 server=built.server, play_round=server.play_round)
    log.log(logging.DEBUG if progress else logging.INFO, "fl_sparse: %s (by our codecs)", result.summary_line())
    if config["summary-file"]:  # what fl-sparse run prints at the end; fl-sparse flower simulate prints it
        lines = [result.summary_line(), *([tracker.how_to_open()] if tracker else [])]
        Path(str(config["summary-file"])).write_text("\n".join(lines) + "\n")


class FlowerRound:
    """Plays one round of ``server`` with remote clients reached through ``grid``."""

    def __init__(self, grid: Grid, server: RoundServer, payload_limit: int, timeout: float):
        self.grid, self.server, self.payload_limit, self.timeout = grid, server, payload_limit, timeout
        self.nodes: dict[int, int] = {}  # client (partition) id -> node id

    def discover(self, wait: float) -> None:
        """Learn which SuperNode serves which partition; waits up to ``wait`` seconds for all of them."""
        num_clients, deadline = self.server.experiment.num_clients, time.monotonic() + wait
        while True:
            asked = [node for node in self.grid.get_node_ids() if node not in self.nodes.values()]
            queries = [Message(RecordDict(), node, messages.QUERY, group_id="partition") for node in asked]
            for node, reply in exchange(self.grid, queries, max(1.0, deadline - time.monotonic())).items():
                try:
                    client, digest = messages.partition_of(reply)
                except PayloadError as error:
                    warnings.warn(f"SuperNode {node} did not say which partition it serves: {error}", stacklevel=2)
                    continue
                if client in self.nodes or not 0 <= client < num_clients:
                    warnings.warn(f"SuperNode {node} claims partition {client}, which is out of range or taken; "
                                  "ignored", stacklevel=2)
                    continue
                if digest is not None and digest != partitions.client_digest(self.server.data, client):
                    warnings.warn(f"SuperNode {node} holds other data than partition {client} of this experiment; "
                                  "ignored: write its folder with fl-sparse flower partition and the run's presets "
                                  "and bindings", stacklevel=2)
                    continue
                self.nodes[client] = node
            if len(self.nodes) == num_clients:
                log.info("fl_sparse: %d SuperNodes serve partitions 0..%d", num_clients, num_clients - 1)
                return
            if time.monotonic() > deadline:
                missing = sorted(set(range(num_clients)) - set(self.nodes))
                raise ConfigError(f"no SuperNode serves partitions {missing[:10]} after {wait:.0f} s; start one "
                                  "per partition with --node-config \"data-path='DIR/partition-K'\" (fl-sparse "
                                  "flower partition) or 'partition-id=K' (Experiment.num_clients="
                                  f"{num_clients}), or raise node-wait")
            time.sleep(1.0)

    def play_round(self, state: ServerState) -> tuple[ServerState, dict[str, float]]:
        sim, r = self.server, state.round + 1
        ctx, clients = sim.open_round(state)
        started = time.perf_counter()
        payloads = sim.encode_downlinks(state, clients)
        outgoing = {}
        for client, payload in zip(clients, payloads):
            content = messages.content(payload, round=r, client=client, freeze_version=state.freeze_version)
            outgoing[self.nodes[client]] = Message(content, self.nodes[client], messages.TRAIN, group_id=str(r))
        flower_down = sum(map(messages.flower_bytes, outgoing.values()))
        replies = exchange(self.grid, list(outgoing.values()), self.timeout)

        arrivals, flower_up = [], 0
        for client in clients:
            reply = replies.get(self.nodes[client])
            if reply is None:
                warnings.warn(f"round {r}: client {client} rejected: no reply within {self.timeout:.0f} s",
                              stacklevel=2)
                continue
            if reply.has_content():
                flower_up += messages.flower_bytes(reply)
            try:
                result, payload = messages.read_upload(reply, r, client, self.payload_limit)
                expected = len(sim.data.client_train[client])
                if result.num_samples != expected:
                    raise PayloadError(f"it reports {result.num_samples} samples, its partition holds {expected}")
            except PayloadError as error:
                warnings.warn(f"round {r}: client {client} rejected: {error}", stacklevel=2)
                continue
            arrivals.append((result, payload))
        uploads, up_bytes = sim.receive_uploads(state, arrivals)
        new_state, metrics = sim.close_round(state, ctx, clients, uploads, up_bytes, sum(map(len, payloads)), started)
        metrics.update({"flower_downlink_bytes": float(flower_down), "flower_uplink_bytes": float(flower_up)})
        return new_state, metrics


def exchange(grid: Grid, outgoing: list[Message], timeout: float) -> dict[int, Message]:
    """Push ``outgoing`` and pull their replies every :data:`POLL_S` until each has one or ``timeout`` seconds
    have passed; the replies by the node each message was sent to. (``Grid.send_and_receive`` of Flower's
    deployment runtime sleeps 3 s between pulls, which a round would pay once or twice.)"""
    deadline = time.monotonic() + timeout
    pushed = grid.push_messages(outgoing)
    pending = {message_id: message.metadata.dst_node_id
               for message_id, message in zip(pushed, outgoing) if message_id}  # None: Flower refused to push it
    replies: dict[int, Message] = {}
    while pending:
        for reply in grid.pull_messages(list(pending)):
            node = pending.pop(reply.metadata.reply_to_message_id, None)
            if node is not None:
                replies[node] = reply
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    return replies


class MetricsLog(Callback):
    """Logs each round's metrics at ``level`` (DEBUG under a progress bar), our codec's bytes next to what Flower
    moved, and appends them as one JSON line to ``path`` (if given)."""

    def __init__(self, path: str, level: int = logging.INFO):
        self.path, self.level = path, level

    def on_round_end(self, event: RoundEvent) -> None:
        m = event.metrics
        log.log(self.level, "fl_sparse round %d: codec bytes up %d down %d | Flower message bytes up %d down %d | "
                "rejected %d | train loss %.4f", event.round, m["uplink_bytes"], m["downlink_bytes"],
                 m["flower_uplink_bytes"], m["flower_downlink_bytes"], m["rejected_clients"], m["train_loss"])
        if self.path:
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as handle:
                handle.write(json.dumps({"round": event.round, **m}) + "\n")
