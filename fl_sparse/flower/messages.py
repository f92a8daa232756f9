"""How fl_sparse payloads ride in Flower messages, and what the server accepts back.

Every train message carries two records:

* ``ArrayRecord "fl_sparse.payload"``  one ``Array`` whose ``data`` is our codec's payload, byte for byte
  (``dtype="uint8"``, ``shape=(len,)``, ``stype="fl_sparse.payload"``: Flower moves it in chunks and never
  parses it; nothing here is pickled)
* ``ConfigRecord "fl_sparse.round"``  plain numbers: ``round``, ``client`` and ``freeze_version`` on the
  downlink; ``round``, ``client``, ``num_samples`` and ``train_loss`` on the uplink

A reply is untrusted. :func:`read_upload` checks its shape and types, that it answers the round and client
it was sent for, and that the payload is no longer than :func:`max_payload_bytes` (what any of our codecs
can produce for the model), before the codec decodes a single byte.
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Mapping

from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from fl_sparse.core.errors import PayloadError

if TYPE_CHECKING:  # torch is imported where tensors are made: a query's ClientApp process never needs it
    from fl_sparse.core.interfaces import ClientResult, Tensors

PAYLOAD, ROUND = "fl_sparse.payload", "fl_sparse.round"
PAYLOAD_STYPE = "fl_sparse.payload"
QUERY_PARTITION = "partition_id"  # the key of a query reply: the SuperNode's partition id
QUERY_DIGEST = "partition_sha256"  # and, from a SuperNode that holds only its own data, that data's digest
TRAIN, QUERY = "train", "query"
UPLINK_FIELDS = {"round": int, "client": int, "num_samples": int, "train_loss": float}


def content(payload: bytes, **numbers: int | float) -> RecordDict:
    """A message's content: our payload and the numbers that go with it."""
    array = Array(dtype="uint8", shape=(len(payload),), stype=PAYLOAD_STYPE, data=bytes(payload))
    return RecordDict({PAYLOAD: ArrayRecord({"payload": array}), ROUND: ConfigRecord(dict(numbers))})


def flower_bytes(message: Message) -> int:
    """What Flower's ``message_size_mod`` reports for this message: the bytes its records hold."""
    return sum(record.count_bytes() for record in message.content.values())


def payload_of(message: Message, limit: int | None = None) -> bytes:
    """Our payload inside ``message``; :class:`PayloadError` if it is not there, not ours, or over ``limit``."""
    records = message.content.array_records
    if set(message.content) != {PAYLOAD, ROUND} or PAYLOAD not in records:
        raise PayloadError(f"message holds records {sorted(message.content)}, expected {sorted([PAYLOAD, ROUND])}")
    arrays = records[PAYLOAD]
    array = arrays.get("payload")
    if len(arrays) != 1 or array is None or array.stype != PAYLOAD_STYPE or array.dtype != "uint8":
        raise PayloadError(f"record {PAYLOAD!r} does not hold one fl_sparse payload array")
    if limit is not None and len(array.data) > limit:
        raise PayloadError(f"payload of {len(array.data)} bytes exceeds the {limit} bytes any codec "
                           "writes for this model")
    return array.data


def numbers_of(message: Message, fields: dict[str, type], optional: frozenset[str] = frozenset()
               ) -> dict[str, int | float]:
    """The ``fl_sparse.round`` numbers of ``message``, checked against ``fields`` (name -> type); the record may
    also hold keys of ``optional``, which the caller checks."""
    return checked_numbers(message.content.config_records.get(ROUND), fields, optional)


def checked_numbers(record: Mapping | None, fields: dict[str, type], optional: frozenset[str] = frozenset(),
                    where: str = ROUND) -> dict[str, int | float]:
    """The numbers ``fields`` (name -> int or float) of ``record`` (a message's ``fl_sparse.round`` record, or a
    node worker's frame header, named ``where`` in errors); :class:`PayloadError` unless it holds exactly those
    (and maybe keys of ``optional``), each a number of its type (a bool is not one)."""
    if record is None or not set(fields) <= set(record) <= set(fields) | optional:
        raise PayloadError(f"record {where!r} must hold exactly {sorted(fields)}")
    numbers = {}
    for name, kind in fields.items():
        value = record[name]
        if (isinstance(value, bool) or not isinstance(value, (int, float))
                or (kind is int and not isinstance(value, int))):
            raise PayloadError(f"{where}.{name} = {value!r} is not a {kind.__name__}")
        numbers[name] = kind(value)
    return numbers


def read_upload(reply: Message, round: int, client: int, limit: int) -> tuple[ClientResult, bytes]:
    """A train reply as (the client's result without tensors, its payload); :class:`PayloadError` if the
    reply is an error, malformed, over ``limit`` bytes, or answers another round or client."""
    if reply.has_error():
        raise PayloadError(f"the ClientApp failed: {reply.error.reason[:300]}")
    numbers = numbers_of(reply, UPLINK_FIELDS)
    if (numbers["round"], numbers["client"]) != (round, client):
        raise PayloadError(f"reply is for round {numbers['round']} client {numbers['client']}, "
                           f"expected round {round} client {client}")
    if numbers["num_samples"] < 0 or not math.isfinite(numbers["train_loss"]):
        raise PayloadError(f"num_samples={numbers['num_samples']}, train_loss={numbers['train_loss']} are invalid")
    payload = payload_of(reply, limit)
    from fl_sparse.core.interfaces import ClientResult

    return ClientResult(client, {}, {}, numbers["num_samples"], numbers["train_loss"]), payload


def max_payload_bytes(weights: Tensors) -> int:
    """An upper bound on the length of any fl_sparse payload for a model with these tensors: a FreezeAware
    frame of two sections (a downlink's frozen part, or an uplink's scores), each at most every tensor's record
    in its largest encoding (all values at the wider of float32 and its own dtype, with uint32 indices or a
    bitmask)."""
    section = 64  # container header and slack
    for name, tensor in weights.items():
        n = tensor.numel()
        section += (64 + len(name.encode()) + 4 * tensor.dim() + 8 + math.ceil(n / 8)
                    + n * (4 + max(4, tensor.element_size())))
    return 64 + 2 * section


def partition_reply(message: Message, partition: int, digest: str | None = None) -> Message:
    """A query's reply: the SuperNode's partition and, if it holds its own data, that data's SHA-256."""
    record = {QUERY_PARTITION: partition, **({QUERY_DIGEST: digest} if digest is not None else {})}
    return Message(RecordDict({ROUND: ConfigRecord(record)}), reply_to=message)


def partition_of(reply: Message) -> tuple[int, str | None]:
    """(partition, digest or None) of a query's reply; :class:`PayloadError` if it is an error or malformed."""
    if reply.has_error():
        raise PayloadError(f"the ClientApp failed: {reply.error.reason[:300]}")
    record = reply.content.config_records.get(ROUND)
    digest = record.get(QUERY_DIGEST) if record is not None else None
    if digest is not None and not (isinstance(digest, str) and re.fullmatch("[0-9a-f]{64}", digest)):
        raise PayloadError(f"{ROUND}.{QUERY_DIGEST} = {str(digest)[:80]!r} is not a SHA-256 hex digest")
    return int(numbers_of(reply, {QUERY_PARTITION: int}, frozenset({QUERY_DIGEST}))[QUERY_PARTITION]), digest


def tensors_record(tensors: Tensors) -> ArrayRecord:
    """Tensors a ClientApp keeps between rounds in its ``context.state`` (numpy arrays, no pickle)."""
    return ArrayRecord({name: Array(tensor.detach().cpu().numpy()) for name, tensor in tensors.items()})


def record_tensors(record: ArrayRecord) -> Tensors:
    import torch

    return {name: torch.from_numpy(array.numpy().copy()) for name, array in record.items()}
