"""FLASH's parts (Babakniya et al., TMLR 2023; ``SaraBabakN/flash_fl`` @ fb88313).

* :class:`FlashDensities`     its sparsity-pattern discovery before round 1 (a :class:`MaskDiscovery`): a few
                              clients run dynamic sparse training from one random mask and report only each
                              layer's density; the server averages them into the run's per-layer densities.
* :class:`JointDST`           its JointDST ("jmwst") mask policy: clients prune and regrow once a round, the server
                              keeps the top-|w| of the average under the clients' mean per-layer densities.
* :class:`SparseMomentumStep` the clients' prune and regrow in both (Dettmers and Zettlemoyer's sparse momentum
                              with random growth, ``core.py``).
"""

from __future__ import annotations

import math

import gin
import torch

from fl_sparse.core.discovery import DiscoveryClients, MaskDiscovery
from fl_sparse.core.errors import check
from fl_sparse.core.interfaces import MaskPolicy, Tensors
from fl_sparse.parts.mask_policies import maskable_shapes
from fl_sparse.sparse import mask_ops
from fl_sparse.sparse.budgets import split_capped


class SparseMomentumStep(MaskPolicy):
    """FLASH's client step in its discovery phase, at the end of a local epoch: per layer, prune the ``rate`` of
    its active weights with the smallest magnitude, then regrow as many in total at random positions, spread
    over the layers in proportion to the mean |w| of their active weights (a layer's share capped by its free
    positions, the rest spread over the others). A layer denser than 0.8 whose share is above average prunes at
    most its sparsity (``core.py``, ``adjust_prune_rate``). Counts are exact where FLASH draws Bernoulli
    positions and carries the shortfall to later epochs (``adjusted_growth``); grown weights start at 0."""

    def __init__(self, rate: float):
        self.rate = rate

    def initial_mask(self, weights, generator):
        raise NotImplementedError("SparseMomentumStep is a client step of a discovery phase, not a run's policy")

    def client_step(self, ctx, weights, mask, frozen, gradients):
        names = list(mask)
        active = mask_ops.active_counts(mask)
        mean_abs = {name: float(weights[name][mask[name]].abs().mean()) if active[name] else 0.0 for name in names}
        total_abs = sum(mean_abs.values())
        shares = {name: mean_abs[name] / total_abs if total_abs > 0 else 1 / len(names) for name in names}
        removed, keep = {}, {}
        for name in names:
            density, rate = active[name] / mask[name].numel(), self.rate
            if density > 0.8 and shares[name] > 1 / len(names):
                rate = min(1 - density, rate)
            removed[name] = min(math.ceil(rate * active[name]), active[name] - int(frozen[name].sum())
                                if name in frozen else active[name])
            keep[name] = active[name] - removed[name]
        weights, pruned = mask_ops.prune_to(weights, mask, keep, frozen)  # frozen weights always stay
        free = {name: pruned[name].numel() - keep[name] for name in names}
        grow = split_capped(sum(removed.values()), shares, free)
        targets = {name: keep[name] + grow[name] for name in names}
        return mask_ops.grow_to(weights, pruned, targets, mask_ops.random_scores(pruned, ctx.generator))


@gin.configurable
class FlashDensities(MaskDiscovery):
    """FLASH's sparsity-pattern discovery (stage 1 of SPDST and JointDST; ``flash_fl`` ``training/manager.py``,
    ``train_server_mask``; ``utiles.py``, ``get_avg_mask``).

    The server draws one random mask at the run's initial density d (the same density in every masked layer)
    and sends it with the initial weights to ``fraction`` of the clients. Each trains ``epochs`` local epochs
    under it with :class:`SparseMomentumStep` after every epoch but the last (the prune rate decaying linearly
    from ``prune_rate`` over the local steps), and uploads only its per-layer densities, one float32 per masked
    layer (measured bytes). The server averages them, scales them so that the layers hold d of the masked
    weights (a layer capped at 1, the excess not redistributed), draws that many positions at random in each
    layer, and re-initialises the model: round 1 starts from fresh weights under that mask, the same on every
    client. FLASH's counts are Bernoulli draws, exact only in expectation; here they are exact.
    """

    def __init__(self, fraction: float = 0.1, epochs: int = 10, prune_rate: float = 0.25):
        check(0 < fraction <= 1, f"FlashDensities.fraction={fraction} must lie in (0, 1] (FLASH: 0.1)")
        check(isinstance(epochs, int) and epochs >= 1, f"FlashDensities.epochs={epochs!r} must be an integer >= 1")
        check(0 <= prune_rate < 1, f"FlashDensities.prune_rate={prune_rate} must lie in [0, 1) (FLASH: 0.25)")
        self.fraction, self.epochs, self.prune_rate = fraction, epochs, prune_rate

    def discover(self, clients: DiscoveryClients, weights: Tensors, mask_names: list[str], sparsity: float,
                 generator: torch.Generator) -> tuple[Tensors, Tensors]:
        density = 1.0 - sparsity
        shapes = {name: weights[name].shape for name in mask_names}
        start = self.uniform_mask(shapes, density, generator, weights[mask_names[0]].device)
        chosen = clients.sample(self.fraction)
        client_weights = {client: weights for client in chosen}
        client_masks = {client: start for client in chosen}
        for epoch in range(1, self.epochs + 1):
            # The rate after this epoch's steps (LinearDecay over all local steps); no step after the last epoch.
            step = SparseMomentumStep(self.prune_rate * (1 - epoch / self.epochs)) if epoch < self.epochs else None
            for client in chosen:  # each client its own model: one at a time
                [result] = clients.train([client], client_weights[client], client_masks[client], epoch, step)
                client_weights[client], client_masks[client] = result.weights, result.mask
        reported = [clients.upload(client, {"layer_density": self.layer_densities(client_masks[client], mask_names)})
                    for client in chosen]
        mean = torch.stack([report["layer_density"] for report in reported]).double().mean(0)
        counts = self.consensus_counts(dict(zip(mask_names, mean.tolist())), shapes, density)
        fresh = clients.fresh_weights()
        empty = {name: torch.zeros(shape, dtype=torch.bool, device=fresh[name].device)
                 for name, shape in shapes.items()}
        return fresh, mask_ops.grow_to(fresh, empty, counts, mask_ops.random_scores(empty, generator))[1]

    @staticmethod
    def uniform_mask(shapes: dict, density: float, generator: torch.Generator, device) -> Tensors:
        empty = {name: torch.zeros(shape, dtype=torch.bool, device=device) for name, shape in shapes.items()}
        counts = {name: round(density * math.prod(shape)) for name, shape in shapes.items()}
        return mask_ops.grow_to({n: torch.zeros(s, device=device) for n, s in shapes.items()}, empty, counts,
                                mask_ops.random_scores(empty, generator))[1]

    @staticmethod
    def layer_densities(mask: Tensors, names: list[str]) -> torch.Tensor:
        return torch.tensor([float(mask[name].float().mean()) for name in names], dtype=torch.float32)

    @staticmethod
    def consensus_counts(mean_density: dict[str, float], shapes: dict, density: float) -> dict[str, int]:
        """Per layer, the clients' mean density scaled so that the layers hold ``density`` of the masked weights,
        capped at the layer's size (the excess is not redistributed, as in FLASH), in exact integers."""
        sizes = {name: math.prod(shape) for name, shape in shapes.items()}
        held = sum(mean_density[name] * sizes[name] for name in sizes)
        scale = sum(sizes.values()) * density / held if held > 0 else 0.0
        raw = {name: min(mean_density[name] * scale, 1.0) * sizes[name] for name in sizes}
        total = min(round(sum(raw.values())), sum(sizes.values()))
        return split_capped(total, raw, sizes)


@gin.configurable
class JointDST(MaskPolicy):
    """FLASH's JointDST, "jmwst" in its code (``manager.py`` ``start_federated_learning``, ``client.py``
    ``update``, ``utiles.py`` ``get_next_round_mask``).

    Clients: once a round, half-way through their local steps, each prunes and regrows with
    :class:`SparseMomentumStep` at ``prune_rate`` decayed linearly over the round's steps (so ``prune_rate / 2``
    then; FLASH steps at the end of every epoch but the last, which is the same half-way point for one local
    epoch, its setting), and sends its mask with its weights. Server: every ``update_every`` rounds (from round
    1), per layer, the clients' mean density scaled so that the layers hold the target density (a layer capped at
    its size), and it keeps that many coordinates of the averaged model with the largest |w| (more than the union
    holds: the rest drawn at random among its zeros); the next round's clients start from that mask. FLASH
    reports the averaged model before that mask is applied (denser than the target); here the global model is
    always under its mask. Frozen weights are never pruned; when a stage of the schedule ends the server's step
    sets the next stage's density (FLASH with PFFDST's freezing, flash_pf.gin). Without a discovery phase the
    initial mask is random at the run's density, the same in every layer (FLASH's ``get_rand_mask``).
    """

    def __init__(self, prune_rate: float = 0.25, update_every: int = 1):
        check(0 <= prune_rate < 1, f"JointDST.prune_rate={prune_rate} must lie in [0, 1) (FLASH: 0.25)")
        check(isinstance(update_every, int) and update_every >= 1,
              f"JointDST.update_every={update_every!r} must be an integer >= 1 (FLASH's r_int: 1)")
        self.prune_rate, self.update_every = prune_rate, update_every
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.schedule = None

    def setup(self, model, schedule):
        self.shapes, self.schedule = maskable_shapes(model), schedule

    def initial_mask(self, weights, generator):
        device = next(iter(weights.values())).device
        return FlashDensities.uniform_mask(self.shapes, 1 - self.schedule.initial_sparsity(), generator, device)

    def client_step_epoch(self, ctx, epochs):
        return epochs / 2

    def client_step(self, ctx, weights, mask, frozen, gradients):
        return SparseMomentumStep(self.prune_rate / 2).client_step(ctx, weights, mask, frozen, gradients)

    def server_step(self, ctx, weights, mask, frozen):
        phase = ctx.phase
        if ((phase.round - 1) % self.update_every and not phase.stage_ends) or ctx.votes is None or not ctx.uploads:
            return weights, mask
        # When a stage ends (flash_pf.gin) the next one's clients start at its density, around what was frozen.
        sparsity = self.schedule.next_stage_sparsity(phase.round) if phase.stage_ends else phase.sparsity
        votes = ctx.votes()
        mean_density = {name: float(votes[name].sum()) / (ctx.uploads * math.prod(shape))
                        for name, shape in self.shapes.items()}
        counts = FlashDensities.consensus_counts(mean_density, self.shapes, 1 - sparsity)
        weights, mask = mask_ops.prune_to(weights, mask, counts, frozen)
        return mask_ops.grow_to(weights, mask, counts, mask_ops.random_scores(mask, ctx.generator))
