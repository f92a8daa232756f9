"""FedTiny's adaptive BatchNorm selection (Huang et al., ICDCS 2023, arXiv 2212.01977; the first author's code
``Little0o0/FedML`` branch ``fedlottery`` @ 4d03aff2, "FedLottery" there): a discovery phase that picks the
initial mask among candidates by how well each does once the clients have re-estimated its BatchNorm statistics.
Its progressive pruning is :class:`~fl_sparse.parts.mask_policies.ScoredReadjust` with ``layers_per_step``.
"""

from __future__ import annotations

import math

import gin
import torch

from fl_sparse.core.discovery import DiscoveryClients, MaskDiscovery
from fl_sparse.core.errors import ConfigError, check
from fl_sparse.core.interfaces import Tensors
from fl_sparse.sparse import mask_ops

STATISTICS = ("running_mean", "running_var")
MAX_DRAWS = 1000


@gin.configurable
class AdaptiveBNSelection(MaskDiscovery):
    """Choose the initial mask among ``candidates`` by their loss after BatchNorm re-estimation.

    The server draws each candidate's per-layer densities around the target d, ``d * (1 + u)`` with
    ``u ~ U(-spread, spread)`` per layer, redrawn until the masked layers' overall density is within ``tolerance``
    (relative) of d; each layer keeps its largest initial weights (biases and BatchNorm are never masked). Round
    trip 1: each of ``fraction`` of the clients receives every candidate, re-estimates the BatchNorm running
    statistics from reset with ``passes`` forward passes over ``data_fraction`` of its data, and uploads them
    with its sample count; the server averages them weighted by sample count (FedTiny's code resets its
    accumulator inside the client loop, so only the last client counts: a bug not copied). Round trip 2: each
    client evaluates every candidate with those statistics on its data and uploads its loss sum and count; the
    server keeps the candidate with the lowest sample-weighted loss and installs its statistics. Every candidate
    model sent and every upload is counted. Needs a model with BatchNorm (e.g. ``Experiment.model = @LeNetBN``).
    """

    def __init__(self, candidates: int = 5, fraction: float = 1.0, passes: int = 10, data_fraction: float = 0.1,
                 spread: float = 0.5, tolerance: float = 0.02):
        check(isinstance(candidates, int) and candidates >= 1,
              f"AdaptiveBNSelection.candidates={candidates!r} must be an integer >= 1")
        check(0 < fraction <= 1 and 0 < data_fraction <= 1,
              f"AdaptiveBNSelection.fraction={fraction} and data_fraction={data_fraction} must lie in (0, 1]")
        check(isinstance(passes, int) and passes >= 1, f"AdaptiveBNSelection.passes={passes!r} must be >= 1")
        check(0 <= spread < 1 and tolerance > 0,
              f"AdaptiveBNSelection.spread={spread} must lie in [0, 1) and tolerance={tolerance} be > 0")
        self.candidates, self.fraction, self.passes = candidates, fraction, passes
        self.data_fraction, self.spread, self.tolerance = data_fraction, spread, tolerance

    def candidate(self, weights: Tensors, mask_names: list[str], density: float,
                  generator: torch.Generator) -> Tensors:
        """One candidate mask: per-layer densities drawn around ``density``, each layer's largest |w| kept."""
        sizes = {name: weights[name].numel() for name in mask_names}
        total = sum(sizes.values())
        for _ in range(MAX_DRAWS):
            spread = (torch.rand(len(mask_names), generator=generator, dtype=torch.float64) * 2 - 1) * self.spread
            counts = {name: min(size, round(density * (1 + float(u)) * size))
                      for (name, size), u in zip(sizes.items(), spread)}
            if abs(sum(counts.values()) / total - density) <= self.tolerance * density:
                break
        else:
            raise ConfigError(f"AdaptiveBNSelection: no candidate within tolerance={self.tolerance} of density "
                              f"{density:.4f} in {MAX_DRAWS} draws; raise tolerance or lower spread")
        empty = {name: torch.zeros_like(weights[name], dtype=torch.bool) for name in mask_names}
        return mask_ops.grow_to(weights, empty, counts, {name: weights[name].abs() for name in mask_names})[1]

    def setup(self, model):
        if not any(name.endswith(STATISTICS) for name, _ in model.named_buffers()):
            raise ConfigError(f"AdaptiveBNSelection (FedTiny) needs a model with BatchNorm, not "
                              f"{type(model).__name__}: bind Experiment.model = @LeNetBN (or ResNet18)")

    def discover(self, clients: DiscoveryClients, weights: Tensors, mask_names: list[str], sparsity: float,
                 generator: torch.Generator) -> tuple[Tensors, Tensors]:
        statistic_names = [name for name in weights if name.endswith(STATISTICS)]
        masks = [self.candidate(weights, mask_names, 1.0 - sparsity, generator) for _ in range(self.candidates)]
        chosen = clients.sample(self.fraction)
        statistics = [self._averaged_statistics(clients, chosen, mask_ops.apply_mask(weights, mask), mask,
                                                statistic_names) for mask in masks]
        losses = [self._mean_loss(clients, chosen, {**mask_ops.apply_mask(weights, mask), **stats}, mask)
                  for mask, stats in zip(masks, statistics)]
        best = min(range(len(masks)), key=lambda index: (losses[index], index))
        return {**weights, **statistics[best]}, masks[best]

    def _averaged_statistics(self, clients: DiscoveryClients, chosen: list[int], model: Tensors, mask: Tensors,
                             names: list[str]) -> Tensors:
        """Round trip 1 for one candidate: the clients' re-estimated statistics, weighted by sample count."""
        totals, samples = {name: torch.zeros_like(model[name], dtype=torch.float64) for name in names}, 0.0
        for client in chosen:
            buffers, _, count = clients.forward(client, model, mask, self.passes, self.data_fraction,
                                                update_statistics=True)
            report = clients.upload(client, {**{name: buffers[name] for name in names},
                                             "samples": torch.tensor([float(count)])})
            weight = float(report["samples"][0])
            samples += weight
            for name in names:
                totals[name] += weight * report[name].double()
        return {name: (total / max(samples, 1.0)).to(model[name].dtype) for name, total in totals.items()}

    def _mean_loss(self, clients: DiscoveryClients, chosen: list[int], model: Tensors, mask: Tensors) -> float:
        """Round trip 2 for one candidate: the sample-weighted mean loss over the clients' data."""
        loss_sum, samples = 0.0, 0.0
        for client in chosen:
            _, loss, count = clients.forward(client, model, mask)
            report = clients.upload(client, {"loss": torch.tensor([loss, float(count)], dtype=torch.float64)})
            loss_sum, samples = loss_sum + float(report["loss"][0]), samples + float(report["loss"][1])
        return loss_sum / samples if samples else math.inf
