"""What a client does with one train message, wherever it runs: in the ClientApp's own process (no node worker)
or in the node worker beside the SuperNode (:mod:`fl_sparse.flower.nodeworker`).

Between rounds a client keeps only what the codecs say a receiver holds: the frozen set and its values, as
delivered once by ``FreezeAware``'s frozen-part section (:class:`FrozenMemory`). The same weights reach training
as in the in-process engine, bit for bit.
"""

from __future__ import annotations

import dataclasses
import time
from typing import TYPE_CHECKING

from fl_sparse.core.errors import PayloadError

if TYPE_CHECKING:
    from fl_sparse.core.interfaces import ClientResult, Tensors
    from fl_sparse.flower.setup import Built

DOWNLINK_FIELDS = {"round": int, "client": int, "freeze_version": int}


@dataclasses.dataclass
class FrozenMemory:
    """What this client holds of the global frozen part: its version, set and values."""

    version: int = 0
    frozen: Tensors = dataclasses.field(default_factory=dict)
    values: Tensors = dataclasses.field(default_factory=dict)

    def link(self, direction: str, client: int, version: int, mask: Tensors, schema):
        from fl_sparse.core.interfaces import Link

        return Link(direction, client, self.frozen, self.values, version, mask, schema=schema)


@dataclasses.dataclass
class Trained:
    """A client's answer to one downlink: its encoded update, its training result, what it now holds of the
    frozen part, and where the time went (seconds of decode, train, encode)."""

    payload: bytes
    result: ClientResult
    memory: FrozenMemory
    seconds: dict[str, float]


def train_on_downlink(built: Built, client: int, numbers: dict, payload: bytes, memory: FrozenMemory) -> Trained:
    """Decode ``payload`` (the downlink of ``numbers['round']``) against the model's schema, train ``client`` as the
    in-process engine would, and encode its update with the uplink codec. ``numbers``: the checked
    :data:`DOWNLINK_FIELDS`; ``memory``: what the client held before this message."""
    from fl_sparse.core.interfaces import Message as Update
    from fl_sparse.training.client import train_client

    server = built.server
    schema, exp = server.schema, server.experiment
    round, version = numbers["round"], numbers["freeze_version"]
    if numbers["client"] != client:
        raise PayloadError(f"message for client {numbers['client']} reached the SuperNode of partition {client}")
    started = time.perf_counter()
    down = memory.link("down", client, version, {}, schema)
    received = exp.downlink_codec.decode(payload, down)
    delivered = exp.downlink_codec.frozen_part(payload, down)
    if delivered is not None:
        memory = FrozenMemory(version, delivered.masks, delivered.tensors)
    elif version != memory.version:
        raise PayloadError(f"round {round}: the server sent freeze version {version} without its frozen part; "
                           f"this client holds version {memory.version}")
    decoded = time.perf_counter()
    task = server.task(client, received, memory.frozen, round)
    result = train_client(server.job, task, server.round_context(round))
    trained = time.perf_counter()
    up = memory.link("up", client, version, received.masks, schema)
    reply = exp.uplink_codec.encode(Update(result.weights, result.mask, result.scores), up)
    exp.uplink_codec.delivered(up)
    seconds = {"decode": decoded - started, "train": trained - decoded, "encode": time.perf_counter() - trained}
    return Trained(reply, result, memory, seconds)
