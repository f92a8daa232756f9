"""The clients a :class:`~fl_sparse.core.discovery.MaskDiscovery` talks to before round 1, in this process: the
run's own data, executor, codecs and accounting, so that a discovery phase is trained, encoded and counted like
the rounds that follow it."""

from __future__ import annotations

import dataclasses
import math

import torch
from torch.func import functional_call

from fl_sparse.core.discovery import DiscoveryClients
from fl_sparse.core.errors import check
from fl_sparse.core.interfaces import (
    ClientResult,
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
from fl_sparse.training.client import ClientTask, client_batches


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
        server = self.server
        tasks, batch_seed = [], int(generator(self.seed, "discovery", epoch, 0).initial_seed())
        for client in clients:
            received = self._send_down(client, weights, mask) if resend else Message(weights, mask)
            indices = self.client_samples(client, samples)
            # Round 0 is no round's; a seed drawn from the discovery stream keys each epoch's batch order.
            tasks.append(ClientTask(client, received.tensors, received.masks, {}, indices, batch_seed, 0))
            self.flops += accounting.training_flops(server.macs, mask, {}, len(indices))
        job = dataclasses.replace(server.job, epochs=1, mask_policy=policy or NoMask())
        phase = Phase(0, 0, self.sparsity, 0.0, True, False, False, 0.0)
        ctx = RoundContext(phase, generator(self.seed, "discovery", epoch))
        return self.experiment.executor.train(job, tasks, ctx)

    def _send_down(self, client: int, weights: Tensors, mask: Tensors) -> Message:
        codec, link = self.experiment.downlink_codec, Link("down", client, {}, {}, 0, mask, self.server.schema)
        payload = codec.encode(Message(weights, mask), link)
        self.bytes += len(payload)
        return codec.decode(payload, link)

    @torch.no_grad()
    def forward(self, client: int, weights: Tensors, mask: Tensors, passes: int = 1, data_fraction: float = 1.0,
                update_statistics: bool = False) -> tuple[Tensors, float, int]:
        server, job = self.server, self.server.job
        params, buffers = job.split(self._send_down(client, weights, mask).tensors)
        buffers = {name: _reset(name, b) if update_statistics else b.clone() for name, b in buffers.items()}
        indices = server.data.client_train[client]
        order = torch.randperm(len(indices), generator=generator(self.seed, "discovery", 0, 2, client))
        subset = indices[order[:math.ceil(data_fraction * len(indices))].to(indices.device)]
        batches = torch.arange(len(subset), device=subset.device).split(job.batch_size)
        was_training = job.model.training
        job.model.train(update_statistics)
        try:
            for _ in range(passes):
                total = 0.0
                for inputs, labels in client_batches(server.data, subset, batches):
                    logits = functional_call(job.model, (params, buffers), (inputs,))
                    total += float(job.objective.loss(logits, labels, params, params)) * len(labels)
        finally:
            job.model.train(was_training)
        self.flops += accounting.forward_flops(server.macs, mask, passes * len(subset))
        return buffers, total if passes else 0.0, len(subset)

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


def _reset(name: str, buffer: torch.Tensor) -> torch.Tensor:
    """A normalisation layer's running statistic as a fresh layer holds it (mean 0, variance 1, no batches
    counted); other buffers unchanged."""
    if name.endswith("running_var"):
        return torch.ones_like(buffer)
    if name.endswith(("running_mean", "num_batches_tracked")):
        return torch.zeros_like(buffer)
    return buffer.clone()
