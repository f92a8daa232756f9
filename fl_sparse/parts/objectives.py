"""Local objectives and the client optimiser, all pure functions of tensors (vmap-friendly)."""

from __future__ import annotations

import gin
import torch
import torch.nn.functional as F

from fl_sparse.core.errors import check
from fl_sparse.core.interfaces import ClientOptimizer, LearningRateSchedule, LocalObjective, Tensors


@gin.configurable
class CrossEntropy(LocalObjective):
    """Cross-entropy of the logits.

    ``reference_softmax=True`` is a reference-compatibility switch: the public FedDST/PFFDST LeNet ends in
    a softmax and then feeds those probabilities to ``nn.CrossEntropyLoss``, i.e. a second softmax. That
    squashes every gradient and keeps training near chance for many rounds. Use it only to reproduce the
    reference's numbers; predictions (argmax) are unaffected, so evaluation needs no switch.
    """

    def __init__(self, reference_softmax: bool = False):
        self.reference_softmax = reference_softmax

    def loss(self, logits, targets, params, global_params):
        return F.cross_entropy(F.softmax(logits, dim=1) if self.reference_softmax else logits, targets)


@gin.configurable
class Proximal(CrossEntropy):
    """FedProx (Li et al. 2020): cross-entropy + mu/2 * ||w - w_global||^2 over all parameters.

    ``global_params`` are the weights the client received, held as constants, so the term adds exactly
    mu * (w - w_global) to the gradient (the reference code's copy was detached from the wrong tensor,
    which made the term a no-op).
    """

    def __init__(self, mu: float = 1.0, reference_softmax: bool = False):
        check(mu >= 0, f"Proximal.mu={mu} must be >= 0")
        super().__init__(reference_softmax)
        self.mu = mu

    def loss(self, logits, targets, params, global_params):
        penalty = sum(((params[name] - global_params[name]) ** 2).sum() for name in params)
        return super().loss(logits, targets, params, global_params) + 0.5 * self.mu * penalty


@gin.configurable
class Extrusion(CrossEntropy):
    """FedMef's budget-aware extrusion (Huang et al., CVPR 2024): in a round whose server step will prune, the
    client's loss adds a penalty on theta_low, per layer the weights the server would prune if they did not move
    (:meth:`MaskPolicy.planned_prune`; with :class:`ScoredReadjust` the k smallest-|w| active weights of the model
    the client received), so that training moves what they carry into the weights that stay. The term is absent
    in rounds that prune nothing, and its gradient is exactly 0 outside theta_low.

    ``norm='squared'``, ``fraction=1``, ``per_step=False`` (the defaults): ``strength * ||theta_low||^2`` over the
    whole planned set, fixed for the round: gradient ``2 * strength * w`` on theta_low. The research code
    (Little0o0/FedML branch aaai @ 6e704fd3, fedml_api/standalone/fedmem/my_model_trainer_classification.py:39-52
    and 238-260, defaults main_fedavg.py:112, 134-140): ``norm='l2'`` (``strength * sum over layers of
    ||theta_low||_2``, its ``p = 2``), ``fraction=0.5`` (its ``num_growth // 2`` per layer) and ``per_step=True``
    (``update_penalty_index`` re-chooses, before every local step, the smallest-|w| active weights of the current
    model; its ``fix_penalty = 0``). Its strength rises by 1e-4 per step up to 0.01 (``delta_lam``); here it is
    0.01 from the first step. Its budget-aware learning rate is :class:`BudgetAwareRate`, which reads
    :meth:`budget_penalty` in the rounds with a term."""

    def __init__(self, strength: float = 0.01, reference_softmax: bool = False, norm: str = "squared",
                 fraction: float = 1.0, per_step: bool = False):
        check(strength >= 0, f"Extrusion.strength={strength} must be >= 0 (FedMef: 0.01)")
        check(norm in ("squared", "l2"), f"Extrusion.norm={norm!r}: give 'squared' or 'l2' (FedMef's code)")
        check(0 < fraction <= 1, f"Extrusion.fraction={fraction} must lie in (0, 1] (FedMef's code: 0.5)")
        super().__init__(reference_softmax)
        self.strength, self.norm, self.fraction, self.per_step = strength, norm, fraction, per_step

    def at_round(self, ctx, weights, mask, frozen, mask_policy):
        low = mask_policy.planned_prune(ctx, weights, mask, frozen)
        if not self.strength or not any(bool(m.any()) for m in low.values()):
            return self
        counts = {name: int(int(m.sum()) * self.fraction) for name, m in low.items()}
        if self.per_step:  # the set is chosen again at every step among the active (and unfrozen) weights
            candidates = {name: mask[name] & ~frozen[name] if name in frozen else mask[name] for name in counts}
            return _Extruding(self, candidates, counts)
        # The planned set is the k smallest: keep its smallest `fraction`.
        return _Extruding(self, {name: _smallest(weights[name], m, counts[name]) for name, m in low.items()}, None)


def _smallest(values: torch.Tensor, within: torch.Tensor, count: int) -> torch.Tensor:
    """A bool tensor marking the ``count`` smallest-|value| entries among those ``within`` marks (ties: the lower
    index)."""
    magnitude = torch.where(within, values.detach().abs(), torch.full_like(values.detach(), float("inf")))
    gate = torch.zeros(magnitude.numel(), dtype=torch.bool, device=magnitude.device)
    if count:
        gate[torch.sort(magnitude.flatten(), stable=True).indices[:count]] = True
    return gate.view_as(magnitude)


class _Extruding(LocalObjective):
    """An :class:`Extrusion` bound to one round: theta_low fixed (``counts`` None), or the ``counts[name]``
    smallest-|w| of the ``gates`` chosen again from the current weights at each step."""

    def __init__(self, base: Extrusion, gates: Tensors, counts: dict[str, int] | None):
        self.base, self.gates, self.counts = base, {n: g for n, g in gates.items() if g.any()}, counts
        self._last: tuple[list[torch.Tensor], tuple, Tensors] | None = None

    def theta_low(self, params: Tensors) -> Tensors:
        if self.counts is None:
            return self.gates
        # A step reads the set twice at the same weights (the budget-aware rate, then the loss on detached leaves,
        # which share storage and version counter): choose it once. The memo holds the tensors, so their storage
        # stays alive and an equal (pointer, version) key means the same values.
        names = [name for name in self.gates if self.counts[name]]
        key = tuple((params[name].data_ptr(), params[name]._version) for name in names)
        if self._last is None or self._last[1] != key:
            low = {name: _smallest(params[name], self.gates[name], self.counts[name]) for name in names}
            self._last = ([params[name] for name in names], key, low)
        return self._last[2]

    def loss(self, logits, targets, params, global_params):
        low = self.theta_low(params)
        if self.base.norm == "squared":
            penalty = sum((params[name][gate] ** 2).sum() for name, gate in low.items())
        else:
            penalty = sum(torch.linalg.vector_norm(params[name][gate]) for name, gate in low.items())
        return self.base.loss(logits, targets, params, global_params) + self.base.strength * penalty

    def budget_penalty(self, params: Tensors) -> float:
        """Sum over layers of ``||theta_low||_2`` (unsquared), the research code's ``penalty`` that its
        budget-aware learning rate reads (my_model_trainer_classification.py:249)."""
        with torch.no_grad():
            low = self.theta_low(params)
            return float(sum(torch.linalg.vector_norm(params[name][gate]) for name, gate in low.items()))


@gin.configurable
class ExponentialDecay(LearningRateSchedule):
    """``start`` in round 1, decaying by a constant factor per round to ``end`` in round ``rounds`` (and held
    there after): ``start * (end / start) ** ((r - 1) / (rounds - 1))``. SparsyFed's CIFAR-10 setting: 0.5 to
    0.01 over 700 rounds."""

    def __init__(self, start: float = gin.REQUIRED, end: float = gin.REQUIRED, rounds: int = gin.REQUIRED):
        check(start > 0 and end > 0, f"ExponentialDecay(start={start}, end={end}) needs rates > 0")
        check(isinstance(rounds, int) and rounds >= 1, f"ExponentialDecay.rounds={rounds!r} must be an integer >= 1")
        self.start, self.end, self.rounds = float(start), float(end), rounds

    def rate(self, round: int) -> float:
        progress = min(1.0, (round - 1) / max(1, self.rounds - 1))
        return self.start * (self.end / self.start) ** progress


@gin.configurable
class BudgetAwareRate(LearningRateSchedule):
    """FedMef's budget-aware learning rate (Huang et al., CVPR 2024), as its research code computes it
    (Little0o0/FedML branch ``aaai`` @ 6e704fd3, ``fedml_api/standalone/fedmem/my_model_trainer_classification.py``):

    * every round, ``alpha = start * (end / start) ** ((r - 1) / rounds)`` in round r (line 187, with their 0-based
      ``round_idx / comm_round``; their lr 0.1, min_lr 0.01);
    * in each local step of a round whose objective has a budget penalty P (:meth:`LocalObjective.budget_penalty`:
      the extrusion's sum of ``||theta_low||_2`` at that step's weights; lines 240-251), the step's rate is
      ``max(alpha, clip(P, end, limit) * start, end)`` (lines 270-284, limit 10). Their SGD has no momentum and
      no weight decay (line 190); here the rate drives whatever SGD is bound.

    Their ``beta`` carries a factor ``(2 - 2p) / (2 - p)`` for a transfer phase of several rounds before each
    adjustment; FedMef's configuration has none (``transfer_epochs = 0``, so ``p = 0`` and the factor is 1), as
    here, where the extrusion lasts the one adjustment round. When P is 0 the step keeps ``alpha`` (theirs keeps the
    previous step's rate). Usable by every algorithm: without a penalty it is the exponential decay alone. Gin:
    ``SGD.lr_schedule = @BudgetAwareRate()`` (it replaces ``SGD.lr``)."""

    def __init__(self, start: float = gin.REQUIRED, end: float = gin.REQUIRED, rounds: int = gin.REQUIRED,
                 limit: float = 10.0):
        check(start > 0 and end > 0, f"BudgetAwareRate(start={start}, end={end}) needs rates > 0 (FedMef: 0.1, 0.01)")
        check(isinstance(rounds, int) and rounds >= 1, f"BudgetAwareRate.rounds={rounds!r} must be an integer >= 1")
        check(limit >= end, f"BudgetAwareRate.limit={limit} must be >= end={end} (FedMef: 10)")
        self.start, self.end, self.rounds, self.limit = float(start), float(end), rounds, float(limit)

    def rate(self, round: int) -> float:
        return self.start * (self.end / self.start) ** ((round - 1) / self.rounds)

    def step_rate(self, round, penalty):
        value = penalty()
        if not value:  # no term this round (None), or nothing left to extrude (0)
            return None
        beta = min(max(value, self.end), self.limit) * self.start
        return max(self.rate(round), beta, self.end)


@gin.configurable
class SGD(ClientOptimizer):
    """SGD with momentum and (coupled) weight decay, as ``torch.optim.SGD`` computes it, except that
    coordinates outside ``trainable`` keep their weight (a -0.0 may become +0.0) and their zero momentum."""

    def __init__(self, lr: float = 0.01, momentum: float = 0.9, weight_decay: float = 1e-3,
                 lr_schedule: LearningRateSchedule | None = None):
        check(lr > 0, f"SGD.lr={lr} must be > 0")
        check(0 <= momentum < 1, f"SGD.momentum={momentum} must lie in [0, 1)")
        check(weight_decay >= 0, f"SGD.weight_decay={weight_decay} must be >= 0")
        check(lr_schedule is None or isinstance(lr_schedule, LearningRateSchedule),
              f"SGD.lr_schedule={lr_schedule!r} must be a learning-rate schedule, e.g. @ExponentialDecay()")
        self.lr, self.momentum, self.weight_decay, self.lr_schedule = lr, momentum, weight_decay, lr_schedule

    def at_round(self, round: int) -> ClientOptimizer:
        """With ``lr_schedule``, an SGD at the schedule's rate of ``round`` (``lr`` is then unused)."""
        if self.lr_schedule is None:
            return self
        return SGD(self.lr_schedule.rate(round), self.momentum, self.weight_decay)

    def at_step(self, round, penalty):
        rate = None if self.lr_schedule is None else self.lr_schedule.step_rate(round, penalty)
        return None if rate is None else SGD(rate, self.momentum, self.weight_decay)

    def init(self, params: Tensors) -> Tensors:
        return {name: torch.zeros_like(p) for name, p in params.items()} if self.momentum else {}

    def step(self, params, grads, state, trainable):
        new_params, new_state = {}, {}
        for name, param in params.items():
            # torch.add(..., alpha=) fuses the scaling and saves one temporary per term.
            direction = torch.add(grads[name], param, alpha=self.weight_decay) if self.weight_decay else grads[name]
            allowed = trainable.get(name)
            if allowed is not None:
                # Zeroing the update is one pass where selecting old values (torch.where) took two and cost
                # 3x the time of the whole dense step on LeNet's fc1. It leaves untrainable coordinates
                # bitwise alone because momentum starts at +0.0 there and p + (+-0.0) == p.
                direction = direction * allowed
            if self.momentum:
                direction = torch.add(direction, state[name], alpha=self.momentum)
                new_state[name] = direction
            new_params[name] = torch.add(param, direction, alpha=-self.lr)
        return new_params, new_state

    def step_in_place(self, params, grads, state, trainable):
        # ``step``'s operations in the same order, each written into the caller's tensors: the gradient
        # becomes the direction and then the momentum. Four foreach calls replace ~40 per-tensor ops and
        # their temporaries (on LeNet's fc1, 3 MB each): fewer allocations and less Python per step.
        names = list(params)
        directions = [grads[name] for name in names]
        if self.weight_decay:
            torch._foreach_add_(directions, [params[name] for name in names], alpha=self.weight_decay)
        masked = [name for name in names if name in trainable]
        if masked:
            torch._foreach_mul_([grads[name] for name in masked], [trainable[name] for name in masked])
        if self.momentum:
            torch._foreach_add_(directions, [state[name] for name in names], alpha=self.momentum)
            state = dict(zip(names, directions))
        torch._foreach_add_([params[name] for name in names], directions, alpha=-self.lr)
        return params, state
