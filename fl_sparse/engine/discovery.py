"""The clients a :class:`~fl_sparse.core.interfaces.MaskDiscovery` talks to before round 1, in this process: the
run's own data, executor, codecs and accounting, so that a discovery phase is trained, encoded and counted like
the rounds that follow it."""

from __future__ import annotations

import dataclasses

import torch

from fl_sparse.core.errors import check
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
    ``bytes`` (downlinks with the run's downlink codec, small uploads with :class:`DenseF32`, models with the run's
    uplink codec) and ``flops``."""

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

    def train(self, clients: list[int], weights: Tensors, mask: Tensors, epoch: int, policy: MaskPolicy | None = None,
              samples: int | None = None, resend: bool = True) -> list[ClientResult]:
        server, codec = self.server, self.experiment.downlink_codec
        tasks, batch_seed = [], int(generator(self.seed, "discovery", epoch, 0).initial_seed())
        for client in clients:
            received = Message(weights, mask)
            if resend:
                link = Link("down", client, {}, {}, 0, mask, server.schema)
                payload = codec.encode(received, link)
                self.bytes += len(payload)
                received = codec.decode(payload, link)
            indices = self.client_samples(client, samples)
            # Round 0 is no round's; a seed drawn from the discovery stream keys each epoch's batch order.
            tasks.append(ClientTask(client, received.tensors, received.masks, {}, indices, batch_seed, 0))
            self.flops += accounting.training_flops(server.macs, mask, {}, len(indices))
        job = dataclasses.replace(server.job, epochs=1, mask_policy=policy or NoMask())
        phase = Phase(0, 0, self.sparsity, 0.0, True, False, False, 0.0)
        ctx = RoundContext(phase, generator(self.seed, "discovery", epoch))
        return self.experiment.executor.train(job, tasks, ctx)

    def client_samples(self, client: int, samples: int | None) -> torch.Tensor:
        """The client's sample indices, or ``samples`` of them: the same ones at every call (a draw keyed by the
        client alone), in data-set order."""
        check(0 <= client < self.server.data.num_clients,
              f"discovery client {client} does not exist: the run has clients 0 to {self.server.data.num_clients - 1}")
        indices = self.server.data.client_train[client]
        if samples is None or samples >= len(indices):
            return indices
        order = torch.randperm(len(indices), generator=generator(self.seed, "discovery", client, 0, 2))
        return indices[order[:samples].sort().values.to(indices.device)]

    def upload_model(self, client: int, weights: Tensors, mask: Tensors) -> tuple[Tensors, Tensors]:
        codec = self.experiment.uplink_codec
        link = Link("up", client, {}, {}, 0, {}, self.server.schema)  # the server knows no mask yet: it travels
        payload = codec.encode(Message(weights, mask), link)
        self.bytes += len(payload)
        received = codec.decode(payload, link)
        return received.tensors, received.masks

    def upload(self, client: int, values: Tensors) -> Tensors:
        link = Link("up", client, {}, {}, 0, {}, ModelSchema.of(values))
        payload = self.upload_codec.encode(Message(values, {}), link)
        self.bytes += len(payload)
        return self.upload_codec.decode(payload, link).tensors

    def forward_macs(self) -> dict[str, int]:
        return dict(self.server.macs)

    def fresh_weights(self) -> Tensors:
        exp = self.experiment
        torch.manual_seed(int(generator(self.seed, "discovery", 0, 1).initial_seed()))
        model = exp.model(self.server.data.num_classes)
        model = exp.reparameterization(model) if exp.reparameterization else model
        return {name: t.detach().clone().to(self.server.device) for name, t in model.state_dict().items()}

    def metrics(self) -> dict[str, float]:
        return {"discovery_bytes": float(self.bytes), "discovery_flops": self.flops}
