"""Mask policies: who changes the sparse mask, when, and to what target.

* :class:`NoMask`        dense training.
* :class:`RandomMask`    a fixed random mask at the target sparsity.
* :class:`ClientReadjust` FedDST: clients prune by magnitude and regrow by |gradient| every
                         ``readjust_every`` rounds; the server re-prunes the union of client masks.
* :class:`ServerReadjust` PFFDST's SMR: the server prunes to s by magnitude and regrows to s - f at
                         random; clients never change the mask.
* :class:`ClientTopK`    SparsyFed: after local training each client keeps the global top-k weights by
                         magnitude; the server re-prunes the union the same way.

All arithmetic goes through :mod:`fl_sparse.sparse.mask_ops`, which keeps counts exact.
"""

from __future__ import annotations

import math

import gin
import torch

from fl_sparse.core.errors import check
from fl_sparse.core.interfaces import MaskPolicy, RoundContext, SparsitySchedule, Tensors
from fl_sparse.models import maskable_names
from fl_sparse.sparse import mask_ops
from fl_sparse.sparse.budgets import ERK, DensityBudget


def maskable_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    params = dict(model.named_parameters())
    return {name: tuple(params[name].shape) for name in maskable_names(model)}


def dense_sizes(model: torch.nn.Module) -> dict[str, int]:
    """Per masked tensor (``x.weight``), the size of its layer's other parameters (``x.bias``), for budgets
    that count them."""
    params = dict(model.named_parameters())
    return {name: sum(p.numel() for other, p in params.items()
                      if other.rsplit(".", 1)[0] == name.rsplit(".", 1)[0] and other != name)
            for name in maskable_names(model)}


INITIAL_MASKS = ("random", "magnitude")


@gin.configurable
class NoMask(MaskPolicy):
    """Dense training: no tensor is masked."""

    def initial_mask(self, weights, generator):
        return {}


class BudgetedMask(MaskPolicy):
    """Shared machinery: the run's schedule, a per-layer budget and the set of masked tensors."""

    def __init__(self, budget: DensityBudget | None, initial: str = "random"):
        check(initial in INITIAL_MASKS, f"{type(self).__name__}.initial={initial!r} must be one of "
                                        f"{', '.join(map(repr, INITIAL_MASKS))}")
        self.budget, self.initial = budget or ERK(), initial
        self.schedule: SparsitySchedule | None = None
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.unmasked: dict[str, int] = {}

    def setup(self, model, schedule):
        self.shapes, self.unmasked = maskable_shapes(model), dense_sizes(model)
        self.schedule = schedule

    def counts(self, sparsity: float) -> dict[str, int]:
        return self.budget.counts(self.shapes, sparsity, self.unmasked)

    def initial_mask(self, weights, generator):
        """The budget's count per layer at the initial sparsity: ``initial = "random"`` draws the positions at
        random; ``"magnitude"`` keeps each layer's largest initial weights, as the FedDST and PFFDST code
        does (``dst.py:496``, ``layer_prune`` of the dense initialisation; ties go to the lower index)."""
        empty = {name: torch.zeros(shape, dtype=torch.bool, device=weights[name].device)
                 for name, shape in self.shapes.items()}
        counts = self.counts(self.schedule.initial_sparsity())
        if self.initial == "magnitude":
            scores = {name: weights[name].detach().abs() for name in self.shapes}
        else:
            scores = mask_ops.random_scores(empty, generator)
        return mask_ops.grow_to(weights, empty, counts, scores)[1]

    def grow_for_next_stage(self, ctx: RoundContext, weights: Tensors, mask: Tensors) -> tuple[Tensors, Tensors]:
        """At a stage boundary, grow at random to the next stage's starting density (Algorithm 2)."""
        if not ctx.phase.stage_ends:
            return weights, mask
        counts = self.counts(self.schedule.next_stage_sparsity(ctx.phase.round))
        return mask_ops.grow_to(weights, mask, counts, mask_ops.random_scores(mask, ctx.generator))


@gin.configurable
class RandomMask(BudgetedMask):
    """A random mask drawn once at the schedule's initial sparsity and never changed."""

    def __init__(self, budget: DensityBudget | None = None, initial: str = "random"):
        super().__init__(budget, initial)


@gin.configurable
class ServerReadjust(BudgetedMask):
    """PFFDST server mask readjustment with differential sparsity (SMR, Algorithm 1).

    The model starts at sparsity s - f. After aggregation in a readjustment round the server keeps the
    top (1 - s) weights by magnitude (TopkPrune) and grows back to s - f at random (RandomGrow, grown
    weights start at 0); at ``readjust_until`` it prunes to s and the mask stays fixed. Frozen weights
    are never pruned.
    """

    def __init__(self, budget: DensityBudget | None = None, initial: str = "random"):
        super().__init__(budget, initial)

    def server_step(self, ctx, weights, mask, frozen):
        phase = ctx.phase
        if phase.readjust or phase.finalize:
            weights, mask = mask_ops.prune_to(weights, mask, self.counts(phase.sparsity), frozen)
        if phase.readjust:
            grow_counts = self.counts(phase.sparsity - phase.differential)
            weights, mask = mask_ops.grow_to(weights, mask, grow_counts,
                                             mask_ops.random_scores(mask, ctx.generator))
        return self.grow_for_next_stage(ctx, weights, mask)


@gin.configurable
class ClientReadjust(BudgetedMask):
    """FedDST client mask readjustment (Bibikar et al., AAAI 2022).

    In a readjustment round each sampled client, after local training, prunes a fraction
    alpha_r = ratio/2 * (1 + cos(pi * r / readjust_until)) of its active, unfrozen weights by magnitude
    and regrows as many among the inactive ones by largest |gradient| (grown weights start at 0; an
    active weight is never overwritten). The server then re-prunes the union of the client masks to the
    target sparsity by magnitude. Unlike the reference code, every sampled client readjusts once per
    readjustment round with the decayed ratio (the reference gated rounds by the decayed ratio but
    pruned with the constant one, and only on some clients).

    Regrown weights arrive at the server as exactly 0 and average to 0, so when the union holds fewer
    non-zero weights than the target count, the server prune must keep some zero-valued coordinates, all
    tied. ``tie_break`` chooses among them: ``"index"`` (default) the lower flat index (deterministic, but a
    positional bias: the first rows of a layer); ``"random"`` a draw from the round's seeded generator
    (``random_tie_break = True`` is the same); ``"votes"`` the coordinate more clients proposed (held in
    their uploaded masks), then the lower index, which is how the PFFDST paper describes FedDST's server
    deciding; ``"votes_then_grad"`` the votes, then the clients' growth scores: in a readjustment round each
    client uploads the |gradient| of the weights it grew (:meth:`client_scores`, sent beside the weights and
    counted in the uplink bytes) and the server ranks equal votes by their mean over the round's uploads,
    then the lower index. The reference prunes with ``torch.topk`` over the whole tensor, whose order among
    equal values is unspecified; with the other tie-breaks the growth scores never reach the server.

    ``readjust_epoch`` (default None: after the last local epoch) readjusts after that local epoch instead,
    so grown weights train in the remaining epochs before upload and arrive non-zero, as in the authors' code
    where clients mostly readjust after local epoch 1 or 2.
    """

    TIE_BREAKS = ("index", "random", "votes", "votes_then_grad")

    def __init__(self, ratio: float = 0.01, budget: DensityBudget | None = None, random_tie_break: bool = False,
                 initial: str = "random", tie_break: str = "index", readjust_epoch: int | None = None):
        check(0.0 <= ratio <= 1.0, f"ClientReadjust.ratio={ratio} must lie in [0, 1] (FedDST uses 0.01)")
        check(tie_break in self.TIE_BREAKS, f"ClientReadjust.tie_break={tie_break!r} must be one of "
                                            f"{', '.join(map(repr, self.TIE_BREAKS))}")
        check(readjust_epoch is None or (isinstance(readjust_epoch, int) and readjust_epoch >= 1),
              f"ClientReadjust.readjust_epoch={readjust_epoch!r} must be None (the last epoch) or an epoch >= 1")
        super().__init__(budget, initial)
        self.ratio, self.readjust_epoch = ratio, readjust_epoch
        self.tie_break = "random" if random_tie_break else tie_break

    def client_step_epoch(self, ctx, epochs):
        if self.readjust_epoch is None or not ctx.phase.readjust:
            return epochs
        return min(self.readjust_epoch, epochs)

    def decayed_ratio(self, progress: float) -> float:
        return self.ratio / 2.0 * (1.0 + math.cos(math.pi * progress))

    def client_step(self, ctx, weights, mask, frozen, gradients):
        if not ctx.phase.readjust:
            return weights, mask
        alpha = self.decayed_ratio(ctx.phase.progress)
        free = mask_ops.trainable(mask, frozen)
        # Drop no more than can be regrown outside the old mask, so the count stays exact and no
        # weight that was active this round is reset to 0 (a nearly dense layer readjusts less).
        drop = {name: min(round(alpha * int(free[name].sum())), int((~mask[name]).sum())) for name in mask}
        if not any(drop.values()):
            return weights, mask
        before = mask_ops.active_counts(mask)
        keep = {name: before[name] - drop[name] for name in mask}
        pruned_weights, pruned_mask = mask_ops.prune_to(weights, mask, keep, frozen)
        grads = gradients()
        scores = {name: grads[name].abs() for name in mask}
        return mask_ops.grow_to(pruned_weights, pruned_mask, before, scores, exclude=mask)

    def client_scores(self, ctx, received_mask, weights, mask, frozen, gradients):
        if self.tie_break != "votes_then_grad" or not ctx.phase.readjust:
            return {}
        grads = gradients()
        return {name: torch.where(mask[name] & ~received_mask[name], grads[name].abs(), 0.0).to(weights[name].dtype)
                for name in mask if bool((mask[name] & ~received_mask[name]).any())}

    def _secondary(self, ctx) -> dict | None:
        """Per masked tensor, what ranks coordinates the server's prune leaves tied (None: the index or a draw)."""
        if not self.tie_break.startswith("votes") or ctx.votes is None:
            return None
        votes = ctx.votes()
        if self.tie_break == "votes":
            return votes
        scores = ctx.scores() if ctx.scores is not None else {}
        return {name: (count, scores[name]) if name in scores else count for name, count in votes.items()}

    def server_step(self, ctx, weights, mask, frozen):
        tie_break = ctx.generator if self.tie_break == "random" else None
        weights, mask = mask_ops.prune_to(weights, mask, self.counts(ctx.phase.sparsity), frozen,
                                          tie_break=tie_break, secondary=self._secondary(ctx))
        return self.grow_for_next_stage(ctx, weights, mask)


@gin.configurable
class ScoredReadjust(BudgetedMask):
    """The server readjusts the mask from gradients its clients upload: FedMef's base (Huang et al., CVPR 2024),
    and FedTiny's progressive pruning without its block schedule (Huang et al., ICDCS 2023).

    In a readjustment round of the schedule, with ``k = round(alpha_r * a)`` per layer (``a`` its active unfrozen
    weights, ``alpha_r = alpha/2 * (1 + cos(pi * progress))``), each client uploads the k largest |gradient| at
    the positions its received mask leaves out (:meth:`client_scores`, counted in the uplink bytes); the server
    prunes each layer's k smallest active weights of the averaged model (:meth:`planned_prune`; frozen weights
    never) and grows the k positions, among those that were inactive, with the largest mean uploaded score, at 0
    (ties drawn at random from the round's generator). Per-layer counts never change. Clients train under the
    mask they receive. The gradient is the mean over the client's data at its trained weights, where FedMef and
    FedTiny take one minibatch's.

    ``layers_per_step`` (default 0: every layer in every adjustment, FedMef) readjusts only one block of that many
    layers per adjustment, from the output layer towards the input and round again (FedTiny's progressive
    pruning); the other layers keep their masks.
    """

    def __init__(self, alpha: float = 0.2, budget: DensityBudget | None = None, initial: str = "random",
                 layers_per_step: int = 0):
        check(0.0 <= alpha <= 1.0, f"ScoredReadjust.alpha={alpha} must lie in [0, 1] (FedMef: 0.2 or 0.3)")
        check(isinstance(layers_per_step, int) and layers_per_step >= 0,
              f"ScoredReadjust.layers_per_step={layers_per_step!r} must be an integer >= 0 (0: every layer)")
        super().__init__(budget, initial)
        self.alpha, self.layers_per_step = alpha, layers_per_step

    def setup(self, model, schedule):
        super().setup(model, schedule)
        check(not self.layers_per_step or hasattr(schedule, "readjust_every"),
              f"ScoredReadjust.layers_per_step needs a schedule that readjusts every N rounds, not "
              f"{type(schedule).__name__}")

    def adjusted_layers(self, ctx) -> list[str]:
        """The layers this round's adjustment touches: all, or the block whose turn it is (output first)."""
        names = list(self.shapes)
        if not self.layers_per_step:
            return names
        blocks = [names[::-1][start:start + self.layers_per_step]
                  for start in range(0, len(names), self.layers_per_step)]
        adjustment = ctx.phase.round // self.schedule.readjust_every - 1  # 0 for the first adjustment
        return blocks[adjustment % len(blocks)]

    def replaced(self, ctx, mask, frozen) -> dict[str, int]:
        """Per layer, how many weights this round's readjustment replaces (k; 0 outside the adjusted block)."""
        decayed = self.alpha / 2.0 * (1.0 + math.cos(math.pi * ctx.phase.progress))
        free = mask_ops.active_counts(mask_ops.trainable(mask, frozen))
        # A layer can regrow only where its mask leaves room, so k never exceeds its inactive positions: a layer
        # the budget leaves dense (ERK's fc3) is not readjusted, instead of shrinking.
        room = {name: int(held.numel() - held.sum()) for name, held in mask.items()}
        adjusted = set(self.adjusted_layers(ctx))
        return {name: min(round(decayed * free[name]), room[name]) if name in adjusted else 0 for name in mask}

    def planned_prune(self, ctx, weights, mask, frozen):
        if not ctx.phase.readjust:
            return {}
        k, active = self.replaced(ctx, mask, frozen), mask_ops.active_counts(mask)
        _, kept = mask_ops.prune_to(weights, mask, {name: active[name] - k[name] for name in mask}, frozen)
        return {name: mask[name] & ~kept[name] for name in mask}

    def client_scores(self, ctx, received_mask, weights, mask, frozen, gradients):
        if not ctx.phase.readjust:
            return {}
        k, grads, scores = self.replaced(ctx, received_mask, frozen), gradients(), {}
        for name, held in received_mask.items():
            magnitude = grads[name].abs().masked_fill(held, -1.0).flatten()  # held positions never chosen
            count = min(k[name], int((~held).sum()))
            if count:
                top = torch.topk(magnitude, count).indices
                score = torch.zeros_like(magnitude)
                score[top] = magnitude[top]
                scores[name] = score.view_as(grads[name]).to(weights[name].dtype)
        return scores

    def server_step(self, ctx, weights, mask, frozen):
        if not ctx.phase.readjust:
            return weights, mask
        before, low = mask_ops.active_counts(mask), self.planned_prune(ctx, weights, mask, frozen)
        pruned = {name: mask[name] & ~low[name] for name in mask}
        weights = mask_ops.apply_mask(weights, pruned)
        uploaded = ctx.scores() if ctx.scores is not None else {}
        scores = {name: uploaded.get(name, torch.zeros_like(weights[name])) for name in mask}
        return mask_ops.grow_to(weights, pruned, before, scores, exclude=mask, tie_break=ctx.generator)


@gin.configurable
class ClientTopK(MaskPolicy):
    """SparsyFed's mask (Guastella et al., ICLR 2025): global magnitude top-k, on clients and on the server.

    The model starts dense. After local training each client keeps its ``(1 - s) * P`` largest weights by
    magnitude, one threshold shared by the masked tensors. ``dense_first_layer`` (default True) leaves the
    first layer out of the count and dense; SparsyFed's code prunes it under the same threshold
    (``get_parameters_to_prune``, ``_first_layer=False``). The client sends only what it kept. After
    aggregation the server prunes the union of the client masks back to the same count (``server_prune``,
    default True); SparsyFed's server prunes nothing, so the next round's clients receive the union of the
    client supports. Frozen weights are always kept.

    With Powerprop (SparsyFed's re-parameterisation) a weight at 0 gets no gradient, so a client's top-k
    can only re-order weights the global mask already holds. Regrowth is therefore rare, which is the
    paper's point.
    """

    def __init__(self, dense_first_layer: bool = True, server_prune: bool = True):
        self.dense_first_layer, self.server_prune = bool(dense_first_layer), bool(server_prune)
        self.shapes: dict[str, tuple[int, ...]] = {}

    def setup(self, model, schedule):
        self.shapes = maskable_shapes(model)

    @property
    def pruned_names(self) -> list[str]:
        return list(self.shapes)[1:] if self.dense_first_layer else list(self.shapes)

    def count(self, sparsity: float) -> int:
        """Weights kept over :attr:`pruned_names` at ``sparsity``."""
        return round((1.0 - sparsity) * sum(math.prod(self.shapes[name]) for name in self.pruned_names))

    def initial_mask(self, weights, generator):
        return {name: torch.ones(shape, dtype=torch.bool, device=weights[name].device)
                for name, shape in self.shapes.items()}

    def _keep_top_k(self, ctx, weights, mask, frozen):
        return mask_ops.prune_globally_to(weights, mask, self.pruned_names, self.count(ctx.phase.sparsity), frozen)

    def client_step(self, ctx, weights, mask, frozen, gradients):
        return self._keep_top_k(ctx, weights, mask, frozen)

    def server_step(self, ctx, weights, mask, frozen):
        if not self.server_prune:  # the next round's clients receive the union of the client supports
            return weights, mask
        return self._keep_top_k(ctx, weights, mask, frozen)
