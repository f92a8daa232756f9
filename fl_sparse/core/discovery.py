"""The phase before round 1: a :class:`MaskDiscovery` decides the mask round 1 starts from, talking to the
federation's clients through the :class:`DiscoveryClients` the engine lends it (FLASH's per-layer densities,
PruneFL's initial pruning on one client, FedTiny's choice among candidate masks). Kept apart from
:mod:`fl_sparse.core.interfaces`, which a reader of the round loop reads first: most algorithms have no such
phase."""

from __future__ import annotations

import abc

import torch

from fl_sparse.core.interfaces import ClientResult, MaskPolicy, Tensors


class DiscoveryClients(abc.ABC):
    """What the engine lends a :class:`MaskDiscovery`: the federation's clients, before round 1. Every byte it
    moves is encoded, counted and decoded like a round's, and every training step counted in FLOPs."""

    @abc.abstractmethod
    def sample(self, fraction: float) -> list[int]:
        """At least one client, ``fraction`` of the federation, drawn from the run's seeded discovery stream."""

    @abc.abstractmethod
    def train(self, clients: list[int], weights: Tensors, mask: Tensors, epoch: int, policy: MaskPolicy | None = None,
              samples: int | None = None, resend: bool = True) -> list[ClientResult]:
        """Send (weights, mask) down to each client (counted), and train one local epoch under the mask with the
        run's objective and optimiser, then ``policy``'s client step and scores (None: neither). ``epoch`` keys the
        batch order, so that successive calls draw fresh batches. ``samples``: train on that many of the client's
        samples (the same ones, drawn once per client from the discovery stream) instead of all. ``resend=False``:
        nothing is sent, the client goes on from what it holds: the caller passes the result of its previous call,
        changed only by work that runs on that client (PruneFL's initial pruning, which never leaves it)."""

    @abc.abstractmethod
    def upload_model(self, client: int, weights: Tensors, mask: Tensors) -> tuple[Tensors, Tensors]:
        """Send a model (weights under a mask) up from ``client`` with the run's uplink codec, counted and decoded
        against the run's model; returns the (weights, mask) the server decoded."""

    @abc.abstractmethod
    def forward(self, client: int, weights: Tensors, mask: Tensors, passes: int = 1, data_fraction: float = 1.0,
                update_statistics: bool = False) -> tuple[Tensors, float, int]:
        """Send (weights, mask) down to ``client`` (counted) and run its model forward only, ``passes`` times over
        a seeded ``data_fraction`` of its training data: in training mode with the normalisation layers' running
        statistics reset first when ``update_statistics`` (re-estimating them), in evaluation mode otherwise.
        Returns the model's buffers afterwards, the objective summed over the last pass's samples, and their
        number. Nothing is uploaded: the discovery sends what it needs with :meth:`upload`."""

    @abc.abstractmethod
    def upload(self, client: int, values: Tensors) -> Tensors:
        """Send small dense tensors (e.g. one number per layer) up from ``client``: encoded, counted and
        decoded against exactly these names, shapes and dtypes; returns what the server decoded."""

    @abc.abstractmethod
    def forward_macs(self) -> dict[str, int]:
        """Multiply-accumulates of one forward pass of one sample per masked weight, as the run counts FLOPs (a
        discovery that weighs layers by their compute, e.g. PruneFL's cost table)."""

    @abc.abstractmethod
    def fresh_weights(self) -> Tensors:
        """A new initialisation of the model, drawn from the run's seeded discovery stream."""


class MaskDiscovery(abc.ABC):
    """Optional: a phase before round 1 in which clients help decide the initial mask (FLASH's per-layer
    densities; PruneFL's and FedTiny's initial pruning would be others). It replaces
    :meth:`MaskPolicy.initial_mask`; the mask policy owns the mask from round 1 on. Its bytes and FLOPs are
    reported as ``discovery_bytes`` / ``discovery_flops`` and count towards the run's totals (and its budget)."""

    def setup(self, model: torch.nn.Module) -> None:
        """Called once with the run's model before any data moves: refuse a model the discovery cannot use."""

    @abc.abstractmethod
    def discover(self, clients: DiscoveryClients, weights: Tensors, mask_names: list[str], sparsity: float,
                 generator: torch.Generator) -> tuple[Tensors, Tensors]:
        """The (weights, mask) round 1 starts from, given the initial weights, the masked tensors' names and the
        schedule's initial sparsity (the fraction of their weights the mask leaves out)."""
