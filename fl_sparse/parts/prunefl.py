"""PruneFL's parts (Jiang et al., "Model Pruning Enables Efficient Federated Learning on Edge Devices", IEEE
TNNLS 2022, arXiv 1909.12326; the authors' code ``jiangyuang/PruneFL`` @ d3f38c4), at a density cap
(``algorithms/prunefl.gin``).

* :class:`PruneFL`            the mask policy: clients upload squared gradients, the server accumulates them and
                              reconfigures the mask every ``reconfigure_every`` rounds, never above the cap.
* :class:`PruneFLInitial`     the initial pruning on one client before round 1 (a :class:`MaskDiscovery`).
* :func:`reconfigure`         the authors' adjustment (``control/algorithm.py``: ``process_layer``,
                              ``architecture_search``), shared by both.
* :class:`FlopsAndBytesCost`  the per-parameter cost table the adjustment weighs importance against.
"""

from __future__ import annotations

import math

import gin
import torch

from fl_sparse.core.discovery import DiscoveryClients, MaskDiscovery
from fl_sparse.core.errors import check
from fl_sparse.core.interfaces import MaskPolicy, Tensors
from fl_sparse.parts.mask_policies import BudgetedMask
from fl_sparse.sparse import mask_ops
from fl_sparse.sparse.budgets import DensityBudget
from fl_sparse.training.accounting import forward_macs


@gin.configurable
class FlopsAndBytesCost:
    """What keeping one weight of a masked layer costs a client per round, in seconds, derived from the run's byte and
    FLOP accounting where the authors measure it on their devices (``configs/*.py``: ``COMM_COEFFICIENT``,
    ``COMP_COEFFICIENTS``, ``TIME_CONSTANT``): its value down and up (``bytes_per_weight`` at ``bytes_per_second``;
    mask and index overhead left out) plus its training FLOPs (6 x its MACs per sample, as
    :mod:`fl_sparse.training.accounting` counts them, x ``samples_per_round``, at ``flops_per_second``). The round's
    fixed cost (the authors' ``TIME_CONSTANT``) is ``fixed_fraction`` x the dense model's weight-dependent cost.
    Only ratios matter: scaling every cost by one factor changes no decision.

    Defaults: the link is the authors' CIFAR-10 one (``COMM_COEFFICIENT`` 5.56e-6 s per weight, 8 bytes: 1.44 MB/s);
    1 GFLOP/s, ``samples_per_round`` = 375 (Table 1's LeNet clients: 125 samples x 3 epochs) and ``fixed_fraction``
    = 1 are our choices. ``input_shape`` is one sample's, for the MACs (every preset's 32 x 32 RGB images)."""

    def __init__(self, bytes_per_weight: float = 8.0, bytes_per_second: float = 1.44e6, flops_per_second: float = 1e9,
                 samples_per_round: float = 375.0, fixed_fraction: float = 1.0,
                 input_shape: tuple[int, ...] = (3, 32, 32)):
        for name, value in (("bytes_per_weight", bytes_per_weight), ("bytes_per_second", bytes_per_second),
                            ("flops_per_second", flops_per_second), ("samples_per_round", samples_per_round),
                            ("fixed_fraction", fixed_fraction)):
            check(value > 0, f"FlopsAndBytesCost.{name}={value} must be > 0")
        self.seconds_per_weight = bytes_per_weight / bytes_per_second
        self.seconds_per_mac = 6.0 * samples_per_round / flops_per_second
        self.fixed_fraction, self.input_shape = fixed_fraction, tuple(input_shape)

    def table(self, shapes: dict[str, tuple[int, ...]], macs: dict[str, int]) -> tuple[dict[str, float], float]:
        """(seconds per kept weight of each masked layer, the round's fixed seconds)."""
        per_weight = {name: self.seconds_per_weight + self.seconds_per_mac * macs[name] / math.prod(shape)
                      for name, shape in shapes.items()}
        dense = sum(per_weight[name] * math.prod(shape) for name, shape in shapes.items())
        return per_weight, self.fixed_fraction * dense

    def for_model(self, model: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> tuple[dict[str, float], float]:
        return self.table(shapes, forward_macs(model, self.input_shape))


def greedy_additions(numerator: float, denominator: float, importances: list[torch.Tensor], costs: list[float],
                     limit: int) -> torch.Tensor:
    """The authors' ``architecture_search``: candidates (each layer's ``importances``, sorted in decreasing order,
    each costing its layer's ``costs``) are taken by the largest importance / cost, one at a time, while that exceeds
    the ratio (numerator + importance taken) / (denominator + cost taken), at most ``limit`` of them. Returns the
    positions in ``torch.cat(importances)`` of those taken, in the order taken. Each one raises the ratio (a mediant
    of the ratio and a larger one), so it never decreases. Vectorised: the merged order, then prefix sums."""
    gains = torch.cat([imp.double().cpu() for imp in importances])
    unit_costs = torch.cat([torch.full((imp.numel(),), float(cost), dtype=torch.float64)
                            for imp, cost in zip(importances, costs)])
    if gains.numel() == 0 or limit <= 0:
        return torch.zeros(0, dtype=torch.long)
    values = gains / unit_costs
    order = torch.sort(values, descending=True, stable=True).indices  # keeps each layer's own order on ties
    gained = torch.cat([torch.zeros(1, dtype=torch.float64), gains[order].cumsum(0)[:-1]])
    spent = torch.cat([torch.zeros(1, dtype=torch.float64), unit_costs[order].cumsum(0)[:-1]])
    falls = ~(values[order] > (numerator + gained) / (denominator + spent))
    taken = int(falls.nonzero()[0]) if bool(falls.any()) else order.numel()
    return order[:min(taken, limit)]


def reconfigure(weights: Tensors, mask: Tensors, frozen: Tensors, importance: Tensors, cost: dict[str, float],
                fixed_cost: float, decrease: float, cap: int) -> tuple[Tensors, Tensors]:
    """The authors' adjustment, under a cap of ``cap`` active weights over the masked tensors. Per layer, the kept
    weights with the largest |w| are protected, all but ``int(decrease * kept)`` of them (``process_layer``; frozen
    ones always); the other kept weights and the pruned ones are candidates, taken by :func:`greedy_additions` from
    (sum of the protected importances) / (``fixed_cost`` + their cost), while the active count stays within ``cap``
    (when the protected ones alone exceed it, nothing is added, as the authors' ``Exceeds max num``). A kept weight
    taken again keeps its value; every other weight outside the old mask starts at 0."""
    kept = mask_ops.active_counts(mask)
    protect = {name: kept[name] - int(decrease * kept[name]) for name in mask}
    protected = mask_ops.prune_to(weights, mask, protect, frozen)[1]
    names = list(mask)
    numerator = sum(float(importance[name][protected[name]].double().sum()) for name in names)
    denominator = fixed_cost + sum(cost[name] * int(protected[name].sum()) for name in names)
    positions, ranked = [], []
    for name in names:
        candidates = (~protected[name]).flatten().nonzero().squeeze(1)
        scores = importance[name].flatten()[candidates]
        order = torch.sort(scores, descending=True, stable=True).indices
        positions.append(candidates[order])
        ranked.append(scores[order])
    room = cap - sum(int(protected[name].sum()) for name in names)
    taken = greedy_additions(numerator, denominator, ranked, [cost[name] for name in names], room)
    layer_of = torch.cat([torch.full((p.numel(),), i, dtype=torch.long) for i, p in enumerate(positions)])
    new_weights, new_mask = dict(weights), {}
    for i, name in enumerate(names):
        count = int((layer_of[taken] == i).sum())  # a layer's candidates are taken in their own order
        grown = protected[name].clone().flatten()
        grown[positions[i][:count].to(grown.device)] = True
        new_mask[name] = grown.view_as(mask[name])
        new_weights[name] = torch.where(new_mask[name] & mask[name], weights[name], torch.zeros_like(weights[name]))
    return new_weights, new_mask


class SquaredGradients(MaskPolicy):
    """A client's scores for PruneFL: per masked tensor, the squared gradient of its local loss over its data at the
    weights it trained, at every coordinate (kept and pruned). The authors square the sum of the round's minibatch
    gradients along the local steps and weight it by the samples processed; a mask policy sees the gradient at the end
    of local training (``gradients()``), and uploads count equally."""

    def initial_mask(self, weights, generator):
        raise NotImplementedError("SquaredGradients scores a client's update; it is not a run's policy")

    def client_scores(self, ctx, received_mask, weights, mask, frozen, gradients):
        grads = gradients()
        return {name: grads[name].square().to(weights[name].dtype) for name in mask}


def cap_count(shapes: dict[str, tuple[int, ...]], sparsity: float) -> int:
    """The most weights the masked tensors may hold at ``sparsity``: the budgets' ``round((1 - s) * total)``."""
    return round((1.0 - sparsity) * sum(math.prod(shape) for shape in shapes.values()))


def _zeros(weights: Tensors, names) -> Tensors:
    return {name: torch.zeros_like(weights[name], dtype=torch.float64) for name in names}


@gin.configurable
class PruneFL(BudgetedMask):
    """PruneFL's adaptive pruning and growth (the authors' ``AdaptiveServer.main`` with ``--max-density``).

    Clients upload :class:`SquaredGradients` in the rounds that feed a reconfiguration (``score_rounds``: the last
    that many rounds before each; None: every round), through the uplink's scores section, so their bytes are counted.
    The server adds each such round's scores, summed over its uploads, to an accumulator. After every
    ``reconfigure_every``-th round it runs :func:`reconfigure` with that accumulator as the importance, the
    protected share decaying as ``decrease = max_decrease * 0.5 ** (round / half_life)`` and the cap at the
    schedule's density 1 - s, then resets it. The accumulator is server state, checkpointed. Without a discovery
    phase the initial mask is the budget's at s (``initial``, as :class:`BudgetedMask`)."""

    def __init__(self, reconfigure_every: int = 50, score_rounds: int | None = None, max_decrease: float = 0.3,
                 half_life: float = 10000.0, costs: FlopsAndBytesCost | None = None,
                 budget: DensityBudget | None = None, initial: str = "random"):
        check(isinstance(reconfigure_every, int) and reconfigure_every >= 1,
              f"PruneFL.reconfigure_every={reconfigure_every!r} must be an integer >= 1 (the authors: 50)")
        check(score_rounds is None or (isinstance(score_rounds, int) and 1 <= score_rounds <= reconfigure_every),
              f"PruneFL.score_rounds={score_rounds!r} must be None (every round) or an integer in "
              f"[1, reconfigure_every={reconfigure_every}]")
        check(0 <= max_decrease < 1, f"PruneFL.max_decrease={max_decrease} must lie in [0, 1) (the authors: 0.3)")
        check(half_life > 0, f"PruneFL.half_life={half_life} must be > 0 (the authors: 10000)")
        super().__init__(budget, initial)
        self.reconfigure_every, self.score_rounds = reconfigure_every, score_rounds
        self.max_decrease, self.half_life = max_decrease, half_life
        self.costs = costs or FlopsAndBytesCost()
        self.accumulator: Tensors = {}
        self.accumulated_rounds = 0  # rounds added to the accumulator since the last reconfiguration

    def setup(self, model, schedule):
        super().setup(model, schedule)
        self.cost, self.fixed_cost = self.costs.for_model(model, self.shapes)
        self.accumulator = _zeros(dict(model.named_parameters()), self.shapes)
        self.accumulated_rounds = 0

    def uploads_scores(self, round: int) -> bool:
        position = (round - 1) % self.reconfigure_every + 1  # 1 .. reconfigure_every
        return self.score_rounds is None or position > self.reconfigure_every - self.score_rounds

    def decrease(self, round: int) -> float:
        return self.max_decrease * 0.5 ** (round / self.half_life)

    def client_scores(self, ctx, received_mask, weights, mask, frozen, gradients):
        if not self.uploads_scores(ctx.phase.round):
            return {}
        return SquaredGradients().client_scores(ctx, received_mask, weights, mask, frozen, gradients)

    def server_step(self, ctx, weights, mask, frozen):
        round = ctx.phase.round
        if self.uploads_scores(round) and ctx.scores is not None and ctx.uploads:
            for name, score in ctx.scores().items():  # the mean over uploads, times their number: the sum
                self.accumulator[name] += score.double() * ctx.uploads
            self.accumulated_rounds += 1
        if round % self.reconfigure_every:
            return weights, mask
        weights, mask = reconfigure(weights, mask, frozen, self.accumulator, self.cost, self.fixed_cost,
                                    self.decrease(round), cap_count(self.shapes, ctx.phase.sparsity))
        self.accumulator = _zeros(self.accumulator, self.accumulator)
        self.accumulated_rounds = 0
        return weights, mask

    def state_dict(self) -> Tensors:
        return {**{f"accumulator/{name}": acc for name, acc in self.accumulator.items()},
                "accumulated_rounds": torch.tensor([self.accumulated_rounds])}

    def load_state_dict(self, state):
        if not state:  # nothing checkpointed: the accumulator setup made stays
            return
        prefix = "accumulator/"
        self.accumulator = {name[len(prefix):]: acc.clone() for name, acc in state.items() if name.startswith(prefix)}
        self.accumulated_rounds = int(state["accumulated_rounds"])


@gin.configurable
class PruneFLInitial(MaskDiscovery):
    """PruneFL's initial pruning before round 1, on one client (the authors' ``AdaptiveServer.initial_pruning``).

    Client ``client`` receives the initial model (counted) and trains it alone on ``samples`` of its samples (the
    authors: 10 batches of 20), one pass over them per initial round, adding its :class:`SquaredGradients` to a
    local accumulator. Once a round's training loss has fallen to ``loss_gate`` times the first round's (the authors
    wait for the training accuracy to reach 1.5 / classes, which needs an evaluation pass the client does not report),
    it runs :func:`reconfigure` then and every ``adjust_every`` rounds after (protecting all but ``max_decrease`` of
    each layer's kept weights, under the cap), resetting the accumulator. It stops after ``stop_after`` adjustments
    in a row that each changed the density by at most ``stop_change`` (relative), or after ``max_rounds``. The
    pruning never leaves the client: it then uploads the model under its mask (counted, with the run's uplink codec),
    and round 1 starts from it. Should it stop above the cap, the kept weights with the largest |w| over all layers
    are kept, up to the cap."""

    def __init__(self, client: int = 0, samples: int = 200, adjust_every: int = 50, max_rounds: int = 1000,
                 loss_gate: float = 0.9, stop_change: float = 0.1, stop_after: int = 5, max_decrease: float = 0.3,
                 costs: FlopsAndBytesCost | None = None):
        check(isinstance(client, int) and client >= 0, f"PruneFLInitial.client={client!r} must be a client index >= 0")
        for name, value in (("samples", samples), ("adjust_every", adjust_every), ("max_rounds", max_rounds),
                            ("stop_after", stop_after)):
            check(isinstance(value, int) and value >= 1, f"PruneFLInitial.{name}={value!r} must be an integer >= 1")
        check(0 < loss_gate <= 1, f"PruneFLInitial.loss_gate={loss_gate} must lie in (0, 1]")
        check(stop_change >= 0, f"PruneFLInitial.stop_change={stop_change} must be >= 0 (the authors: 0.1)")
        check(0 <= max_decrease < 1,
              f"PruneFLInitial.max_decrease={max_decrease} must lie in [0, 1) (the authors: 0.3)")
        self.client, self.samples, self.adjust_every, self.max_rounds = client, samples, adjust_every, max_rounds
        self.loss_gate, self.stop_change, self.stop_after = loss_gate, stop_change, stop_after
        self.max_decrease, self.costs = max_decrease, costs or FlopsAndBytesCost()
        self.rounds = 0  # initial rounds the last discovery ran, for reports and tests

    def discover(self, clients: DiscoveryClients, weights: Tensors, mask_names: list[str], sparsity: float,
                 generator: torch.Generator) -> tuple[Tensors, Tensors]:
        shapes = {name: tuple(weights[name].shape) for name in mask_names}
        cost, fixed_cost = self.costs.table(shapes, clients.forward_macs())
        cap = cap_count(shapes, sparsity)
        mask = {name: torch.ones_like(weights[name], dtype=torch.bool) for name in mask_names}
        accumulator, first_loss, started, densities = _zeros(weights, mask_names), None, None, []
        for round in range(1, self.max_rounds + 1):
            [result] = clients.train([self.client], weights, mask, round, SquaredGradients(), samples=self.samples,
                                     resend=round == 1)
            weights, mask, self.rounds = result.weights, result.mask, round
            for name, score in result.scores.items():
                accumulator[name] += score.double()
            first_loss = result.train_loss if first_loss is None else first_loss
            if started is None and result.train_loss <= self.loss_gate * first_loss:
                started = round
            if started is None or (round - started) % self.adjust_every:
                continue
            weights, mask = reconfigure(weights, mask, {}, accumulator, cost, fixed_cost, self.max_decrease, cap)
            accumulator = _zeros(weights, mask_names)
            densities.append(sum(mask_ops.active_counts(mask).values()))
            changes = [abs(now / before - 1) <= self.stop_change for before, now in zip(densities, densities[1:])]
            if len(changes) >= self.stop_after and all(changes[-self.stop_after:]):
                break
        weights, mask = mask_ops.prune_globally_to(weights, mask, mask_names, cap)
        return clients.upload_model(self.client, weights, mask)
