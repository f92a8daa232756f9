"""The Flower ClientApp: decode the downlink, run :func:`fl_sparse.training.client.train_client`, encode the reply.

A SuperNode serves one partition of the experiment's federated split: either it holds only that partition's
data, in the folder ``fl-sparse flower partition`` wrote (``--node-config "data-path='DIR/partition-0003'"``,
:mod:`fl_sparse.flower.partitions`), or it splits the whole data set itself and keeps ``partition-id`` of its
node config (``--node-config 'partition-id=3'``; Flower's simulation runtime sets it for each virtual node).
Every process builds the same Experiment from the run config (:mod:`fl_sparse.flower.setup`), so the client
holds the same model skeleton, parts and partition as the server.

Between rounds a client keeps only what the codecs say a receiver holds: the frozen set and its values,
as delivered once by ``FreezeAware``'s frozen-part section, in ``context.state`` (Flower keeps it on the
SuperNode for the run). The same weights reach training as in the in-process engine, bit for bit.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from fl_sparse.flower import log_flower_lines_once, require_flwr

require_flwr()
log_flower_lines_once()

from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.clientapp.mod import message_size_mod  # noqa: E402

from fl_sparse.core.errors import ConfigError, PayloadError  # noqa: E402
from fl_sparse.flower import messages, partitions, setup  # noqa: E402

# torch and the experiment load only in train: a query's process (one per message) answers without them.
if TYPE_CHECKING:
    from fl_sparse.core.interfaces import Tensors

DOWNLINK_FIELDS = {"round": int, "client": int, "freeze_version": int}
MEMORY, FROZEN, FROZEN_VALUES = "fl_sparse.memory", "fl_sparse.frozen", "fl_sparse.frozen_values"

app = ClientApp(mods=[message_size_mod])  # Flower logs each message's size on the SuperNode


@dataclasses.dataclass
class FrozenMemory:
    """What this client holds of the global frozen part: its version, set and values."""

    version: int = 0
    frozen: Tensors = dataclasses.field(default_factory=dict)
    values: Tensors = dataclasses.field(default_factory=dict)

    @classmethod
    def load(cls, state: RecordDict) -> "FrozenMemory":
        if MEMORY not in state.config_records:
            return cls()
        return cls(int(state.config_records[MEMORY]["freeze_version"]),
                   messages.record_tensors(state.array_records[FROZEN]),
                   messages.record_tensors(state.array_records[FROZEN_VALUES]))

    def store(self, state: RecordDict) -> None:
        state[MEMORY] = ConfigRecord({"freeze_version": self.version})
        state[FROZEN] = messages.tensors_record(self.frozen)
        state[FROZEN_VALUES] = messages.tensors_record(self.values)

    def link(self, direction: str, client: int, version: int, mask: Tensors, schema):
        from fl_sparse.core.interfaces import Link

        return Link(direction, client, self.frozen, self.values, version, mask, schema=schema)


def data_path(context: Context) -> str | None:
    """The folder of this SuperNode's own data (node config ``data-path``), or None: it splits the whole data set."""
    path = context.node_config.get("data-path")
    if path is not None and (not isinstance(path, str) or not path):
        raise ConfigError(f"node config data-path={path!r}: give the folder that fl-sparse flower partition wrote "
                          "for this node, e.g. --node-config \"data-path='/data/partition-0003'\"")
    return path


def node_partition(context: Context, num_clients: int | None = None) -> tuple[int, str | None]:
    """This SuperNode's partition and, when it holds only its own data (``data-path``), that data's digest."""
    path = data_path(context)
    if path is None:
        return partition_id(context, num_clients), None
    manifest = partitions.read_manifest(Path(path))
    declared = context.node_config.get("partition-id")
    if declared is not None and declared != manifest["partition"]:
        raise ConfigError(f"node config partition-id={declared!r}, but data-path {path} holds partition "
                          f"{manifest['partition']}; drop partition-id, the folder names the partition")
    return manifest["partition"], manifest["sha256"]


def partition_id(context: Context, num_clients: int | None = None) -> int:
    """This SuperNode's partition, from its node config (checked against ``num_clients`` when given)."""
    value = context.node_config.get("partition-id")
    if (isinstance(value, bool) or not isinstance(value, int) or value < 0
            or (num_clients is not None and value >= num_clients)):
        raise ConfigError(f"node config partition-id={value!r}: start the SuperNode with --node-config "
                          f"'partition-id=K' for a K in [0, Experiment.num_clients)")
    return value


def _built(context: Context) -> setup.Built:
    config = setup.settings(context.run_config)
    return setup.build_cached(setup.Composition.from_run_config(context.run_config), int(config["threads"]),
                              data_path(context))


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this SuperNode serves, and the digest of its data if it holds its own
    (the server checks both against the experiment)."""
    return messages.partition_reply(msg, *node_partition(context))


@app.train()
def train(msg: Message, context: Context) -> Message:
    from fl_sparse.core.interfaces import Message as Update
    from fl_sparse.training.client import train_client

    built = _built(context)
    server = built.server
    schema = server.schema
    exp = server.experiment
    client, _ = node_partition(context, exp.num_clients)  # its data was checked against the split when loaded
    numbers = messages.numbers_of(msg, DOWNLINK_FIELDS)
    round, version = numbers["round"], numbers["freeze_version"]
    if numbers["client"] != client:
        raise PayloadError(f"message for client {numbers['client']} reached the SuperNode of partition {client}")
    payload = messages.payload_of(msg, built.payload_limit)

    memory = FrozenMemory.load(context.state)
    down = memory.link("down", client, version, {}, schema)
    received = exp.downlink_codec.decode(payload, down)
    delivered = exp.downlink_codec.frozen_part(payload, down)
    if delivered is not None:
        memory = FrozenMemory(version, delivered.masks, delivered.tensors)
        memory.store(context.state)
    elif version != memory.version:
        raise PayloadError(f"round {round}: the server sent freeze version {version} without its frozen part; "
                           f"this client holds version {memory.version}")

    task = server.task(client, received, memory.frozen, round)
    result = train_client(server.job, task, server.round_context(round))
    up = memory.link("up", client, version, received.masks, schema)
    reply = exp.uplink_codec.encode(Update(result.weights, result.mask, result.scores), up)
    exp.uplink_codec.delivered(up)
    return Message(messages.content(reply, round=round, client=client, num_samples=result.num_samples,
                                train_loss=result.train_loss), reply_to=msg)
