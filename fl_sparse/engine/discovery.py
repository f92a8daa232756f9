"""The clients a :class:`~fl_sparse.core.interfaces.MaskDiscovery` talks to before round 1, in this process: the
run's own data, executor, codecs and accounting, so that a discovery phase is trained, encoded and counted like
the rounds that follow it."""

from __future__ import annotations

import dataclasses

import torch

from fl_sparse.core.interfaces import (
    ClientResult,
    DiscoveryClients,
    Link,
    MaskPolicy,
    Message,
    ModelSchema,
    Phase,
    RoundContext,
    Tensors,
)
from fl_sparse.core.rng import generator
from fl_sparse.parts.codecs import DenseF32
from fl_sparse.parts.mask_policies import NoMask
from fl_sparse.training import accounting
from fl_sparse.training.client import ClientTask


class InProcessDiscovery(DiscoveryClients):
    """:class:`DiscoveryClients` on a :class:`~fl_sparse.engine.server.RoundServer`'s data and parts. Counts
    ``bytes`` (downlinks with the run's downlink codec, uploads with :class:`DenseF32`) and ``flops``."""

    def __init__(self, server, sparsity: float):
        self.server, self.experiment = server, server.experiment
        self.seed = self.experiment.seed
        self.sparsity = sparsity
        self.bytes, self.flops = 0, 0.0
        self.upload_codec = DenseF32()

    def sample(self, fraction: float) -> list[int]:
        count = min(self.server.data.num_clients, max(1, int(fraction * self.server.data.num_clients)))
        order = torch.randperm(self.server.data.num_clients, generator=generator(self.seed, "discovery", 0))
        return sorted(order[:count].tolist())

    def train(self, clients: list[int], weights: Tensors, mask: Tensors, epoch: int,
              policy: MaskPolicy | None = None) -> list[ClientResult]:
        server, codec = self.server, self.experiment.downlink_codec
        tasks, batch_seed = [], int(generator(self.seed, "discovery", epoch, 0).initial_seed())
        for client in clients:
            link = Link("down", client, {}, {}, 0, mask, server.schema)
            payload = codec.encode(Message(weights, mask), link)
            self.bytes += len(payload)
            received = codec.decode(payload, link)
            indices = server.data.client_train[client]
            # Round 0 is no round's; a seed drawn from the discovery stream keys each epoch's batch order.
            tasks.append(ClientTask(client, received.tensors, received.masks, {}, indices, batch_seed, 0))
            self.flops += accounting.training_flops(server.macs, mask, {}, len(indices))
        job = dataclasses.replace(server.job, epochs=1, mask_policy=policy or NoMask())
        phase = Phase(0, 0, self.sparsity, 0.0, True, False, False, 0.0)
        ctx = RoundContext(phase, generator(self.seed, "discovery", epoch))
        return self.experiment.executor.train(job, tasks, ctx)

    def upload(self, client: int, values: Tensors) -> Tensors:
        link = Link("up", client, {}, {}, 0, {}, ModelSchema.of(values))
        payload = self.upload_codec.encode(Message(values, {}), link)
        self.bytes += len(payload)
        return self.upload_codec.decode(payload, link).tensors

    def fresh_weights(self) -> Tensors:
        exp = self.experiment
        torch.manual_seed(int(generator(self.seed, "discovery", 0, 1).initial_seed()))
        model = exp.model(self.server.data.num_classes)
        model = exp.reparameterization(model) if exp.reparameterization else model
        return {name: t.detach().clone().to(self.server.device) for name, t in model.state_dict().items()}

    def metrics(self) -> dict[str, float]:
        return {"discovery_bytes": float(self.bytes), "discovery_flops": self.flops}
