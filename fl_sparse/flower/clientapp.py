"""The Flower ClientApp: decode the downlink, run :func:`fl_sparse.training.client.train_client`, encode the reply.

A SuperNode serves one partition of the experiment's federated split: either it holds only that partition's
data, in the folder ``fl-sparse flower partition`` wrote (``--node-config "data-path='DIR/partition-0003'"``,
:mod:`fl_sparse.flower.partitions`), or it splits the whole data set itself and keeps ``partition-id`` of its
node config (``--node-config 'partition-id=3'``; Flower's simulation runtime sets it for each virtual node).
Every process builds the same Experiment from the run config (:mod:`fl_sparse.flower.setup`), so the client
holds the same model skeleton, parts and partition as the server.

Flower 1.42's deployment runtime starts a fresh process for every message. A SuperNode whose node config names a
node worker (``worker-socket='DIR/worker.sock'``, ``fl-sparse flower node-worker``) therefore only relays here:
this process imports flwr and the standard library, hands the downlink to the worker
(:mod:`fl_sparse.flower.worker_wire`), which keeps torch, the built client side, the node's data and the frozen
part between messages, and sends back the worker's update. Without ``worker-socket`` the message is handled in
this process (:mod:`fl_sparse.flower.client_side`), with the frozen part kept in ``context.state`` (Flower keeps
it on the SuperNode for the run).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fl_sparse.flower import log_flower_lines_once, require_flwr

require_flwr()
log_flower_lines_once()

from flwr.app import ConfigRecord, Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.clientapp.mod import message_size_mod  # noqa: E402

from fl_sparse.core.errors import ConfigError  # noqa: E402
from fl_sparse.flower import messages, partitions, setup, worker_wire  # noqa: E402
from fl_sparse.flower.client_side import DOWNLINK_FIELDS  # noqa: E402

# torch and the experiment load only in an in-process train: a query's process, and a relay, never need them.
if TYPE_CHECKING:
    from fl_sparse.flower.client_side import FrozenMemory

MEMORY, FROZEN, FROZEN_VALUES = "fl_sparse.memory", "fl_sparse.frozen", "fl_sparse.frozen_values"
WORKER_SOCKET = "worker-socket"  # node config key: the node worker's Unix socket
WORKER_NODE_KEYS = ("data-path", "partition-id")  # what the worker needs of the node config

app = ClientApp(mods=[message_size_mod])  # Flower logs each message's size on the SuperNode


def load_memory(state: RecordDict) -> FrozenMemory:
    from fl_sparse.flower.client_side import FrozenMemory

    if MEMORY not in state.config_records:
        return FrozenMemory()
    return FrozenMemory(int(state.config_records[MEMORY]["freeze_version"]),
                        messages.record_tensors(state.array_records[FROZEN]),
                        messages.record_tensors(state.array_records[FROZEN_VALUES]))


def store_memory(memory: FrozenMemory, state: RecordDict) -> None:
    state[MEMORY] = ConfigRecord({"freeze_version": memory.version})
    state[FROZEN] = messages.tensors_record(memory.frozen)
    state[FROZEN_VALUES] = messages.tensors_record(memory.values)


def worker_socket(context: Context) -> str | None:
    """The node worker's socket (node config ``worker-socket``), or None: this process trains."""
    path = context.node_config.get(WORKER_SOCKET)
    if path is not None and (not isinstance(path, str) or not path):
        raise ConfigError(f"node config {WORKER_SOCKET}={path!r}: give the --socket path of the fl-sparse flower "
                          f"node-worker beside this SuperNode, e.g. --node-config \"{WORKER_SOCKET}='/run/fl/w.sock'\"")
    return path


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server which partition this SuperNode serves, and the digest of its data if it holds its own
    (the server checks both against the experiment)."""
    return messages.partition_reply(msg, *partitions.node_partition(context.node_config))


@app.train()
def train(msg: Message, context: Context) -> Message:
    numbers = messages.numbers_of(msg, DOWNLINK_FIELDS)
    path = worker_socket(context)
    if path is not None:
        return relay(msg, context, path, numbers)
    from fl_sparse.flower.client_side import train_on_downlink

    config = setup.settings(context.run_config)
    built = setup.build_cached(setup.Composition.from_run_config(context.run_config), int(config["threads"]),
                               partitions.data_path(context.node_config))
    # the node's data was checked against the split when it was loaded
    client, _ = partitions.node_partition(context.node_config, built.server.experiment.num_clients)
    memory = load_memory(context.state)
    trained = train_on_downlink(built, client, numbers, messages.payload_of(msg, built.payload_limit), memory)
    if trained.memory is not memory:
        store_memory(trained.memory, context.state)
    return Message(messages.content(trained.payload, round=numbers["round"], client=client,
                                    num_samples=trained.result.num_samples, train_loss=trained.result.train_loss),
                   reply_to=msg)


def relay(msg: Message, context: Context, path: str, numbers: dict) -> Message:
    """Hand the downlink to the node worker at ``path`` and answer with its update; the worker checks the payload
    against the run's model before it reads it, and keeps this run's frozen part."""
    header = {"op": "train", "run": context.run_id, "run_config": dict(context.run_config),
              "node_config": {key: context.node_config[key] for key in WORKER_NODE_KEYS if key in context.node_config},
              **numbers}
    timeout = float(setup.settings(context.run_config)["round-timeout"])  # the server gives up on us then anyway
    answer, uplink = worker_wire.exchange(path, header, messages.payload_of(msg), timeout)
    return Message(messages.content(uplink, round=answer["round"], client=answer["client"],
                                    num_samples=answer["num_samples"], train_loss=answer["train_loss"]),
                   reply_to=msg)
