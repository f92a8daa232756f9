"""Ways a hostile or broken SuperNode can answer a train message: shared by the loopback tests
(tests/test_flower.py) and the faulty ClientApp of the deployment test (faulty_app.py)."""

from __future__ import annotations

import torch
from flwr.app import Array, ArrayRecord, Message, RecordDict

from fl_sparse.core.interfaces import Link
from fl_sparse.core.interfaces import Message as Update
from fl_sparse.flower import messages as wire
from fl_sparse.parts.codecs import AutoSparse

FAULTS = ("corrupt", "oversized", "wrong-schema", "wrong-round", "extra-record", "inflated-samples")


def tamper(reply: Message, fault: str) -> Message:
    """The honest ``reply`` damaged as ``fault`` says."""
    payload = bytes(wire.payload_of(reply))
    numbers = dict(reply.content.config_records[wire.ROUND])
    if fault == "corrupt":  # damaged record headers and the second half lost (values alone carry no check)
        payload = payload[:8] + bytes(b ^ 0xA5 for b in payload[8:72]) + payload[72:len(payload) // 2]
    elif fault == "oversized":  # 64 MiB of junk after the payload: refused before it is decoded
        payload = payload + bytes(64 * 2**20)
    elif fault == "wrong-schema":  # a well-formed payload of another model
        other = {"fc1.weight": torch.ones(7, 3), "conv9.bias": torch.zeros(5)}
        payload = AutoSparse().encode(Update(other, {}), Link("up", 0, {}, {}, 0))
    elif fault == "wrong-round":
        numbers["round"] += 1
    elif fault == "inflated-samples":  # a client claiming more data to weigh more in the average
        numbers["num_samples"] *= 100
    content = wire.content(payload, **numbers)
    if fault == "extra-record":
        content = RecordDict({**content, "junk": ArrayRecord({"x": Array(torch.zeros(3).numpy())})})
    reply.content = content  # same metadata: it still answers the message it was sent for
    return reply
