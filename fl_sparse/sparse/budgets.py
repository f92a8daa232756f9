"""Layer-wise density budgets: how many weights each masked tensor keeps for a global sparsity.

Counts are exact integers. The global kept count is ``round((1 - s) * total)`` over the masked
tensors (biases and norm parameters are dense and not part of the budget); it is split over layers
by the largest-remainder method, so per-layer counts sum to the global target exactly and no layer
exceeds its size.
"""

from __future__ import annotations

import math

import gin
import numpy as np

from fl_sparse.core.errors import check

Shapes = dict[str, tuple[int, ...]]


def _split_exactly(total: int, raw: dict[str, float], sizes: dict[str, int]) -> dict[str, int]:
    """Integer counts close to ``raw`` (already scaled to sum to ``total``), summing to ``total``."""
    floors = {name: min(sizes[name], math.floor(value)) for name, value in raw.items()}
    missing = total - sum(floors.values())
    # Hand the remaining units to the largest fractional parts (name order breaks ties, so it is deterministic).
    order = sorted(raw, key=lambda name: (-(raw[name] - floors[name]), name))
    for name in order:
        if missing <= 0:
            break
        if floors[name] < sizes[name]:
            floors[name] += 1
            missing -= 1
    return floors


class DensityBudget:
    """Turns a global sparsity into an exact kept count per masked tensor. ``unmasked`` (optional) gives, per
    masked tensor, the size of the dense parameters of its layer (its bias), for budgets that count them."""

    def counts(self, shapes: Shapes, sparsity: float, unmasked: dict[str, int] | None = None) -> dict[str, int]:
        check(0.0 <= sparsity < 1.0, f"sparsity {sparsity} is outside [0, 1); use e.g. 0.8")
        sizes = {name: math.prod(shape) for name, shape in shapes.items()}
        target = round((1.0 - sparsity) * sum(sizes.values()))
        return _split_exactly(target, self.raw_counts(shapes, sizes, target), sizes)

    def raw_counts(self, shapes: Shapes, sizes: dict[str, int], target: int) -> dict[str, float]:
        raise NotImplementedError


@gin.configurable
class Uniform(DensityBudget):
    """Every layer gets the same density."""

    def raw_counts(self, shapes, sizes, target):
        density = target / sum(sizes.values())
        return {name: density * size for name, size in sizes.items()}


@gin.configurable
class ERK(DensityBudget):
    """Erdos-Renyi-Kernel as in RigL: density proportional to sum(dims) / prod(dims), solved on densities.
    (The FedDST and PFFDST code scales the ERK *sparsities* instead: :class:`ScaledERKSparsity`.)

    Layers whose density would exceed 1 become dense and the scale is solved again for the rest.
    """

    def __init__(self, power_scale: float = 1.0):
        self.power_scale = power_scale

    def raw_counts(self, shapes, sizes, target):
        score = {name: (sum(shape) / sizes[name]) ** self.power_scale for name, shape in shapes.items()}
        dense: set[str] = set()
        while True:
            free = [name for name in shapes if name not in dense]
            remaining = target - sum(sizes[name] for name in dense)
            weight = sum(score[name] * sizes[name] for name in free)
            scale = remaining / weight if weight > 0 else 0.0
            saturated = [name for name in free if scale * score[name] > 1.0]
            if not saturated:
                break
            dense.update(saturated)
        return {name: float(sizes[name]) if name in dense else scale * score[name] * sizes[name]
                for name in shapes}


@gin.configurable
class ScaledERKSparsity(DensityBudget):
    """The FedDST and PFFDST authors' "ERK" (``bibikar/feddst`` ``models.py:101-154``, ``_weights_by_layer``):
    each layer's ERK *sparsity* ``s_l = 1 - sum(dims) / prod(dims)`` is scaled by one factor so that the
    parameter-weighted mean sparsity is the target, and a layer keeps ``floor((1 - c * s_l) * n_l)`` weights.
    It comes out nearly uniform (LeNet at s = 0.8: conv1 .229, conv2 .205, fc1 .200, fc2 .211, fc3 .286),
    where :class:`ERK` keeps conv1 and fc3 almost dense.

    ``count_biases`` (default True, as the authors): ``n_l`` counts the layer's bias with its weight
    (``layer.named_parameters()``), in the scaling and in the kept count, while only the weight is masked,
    so a layer keeps a few weights more than its density times its weights. The per-layer floor means the
    total is not rounded to the global target exactly (it is at most one weight per layer below it)."""

    def __init__(self, count_biases: bool = True):
        self.count_biases = bool(count_biases)

    def counts(self, shapes, sparsity, unmasked=None):
        check(0.0 <= sparsity < 1.0, f"sparsity {sparsity} is outside [0, 1); use e.g. 0.8")
        sizes = {name: math.prod(shape) for name, shape in shapes.items()}
        n = {name: sizes[name] + ((unmasked or {}).get(name, 0) if self.count_biases else 0) for name in shapes}
        raw = {name: 1.0 - sum(shape) / sizes[name] for name, shape in shapes.items()}
        weighted = sum(raw[name] * n[name] for name in shapes)
        scale = sparsity * sum(n.values()) / weighted if weighted > 0 else 0.0
        return {name: min(sizes[name], max(0, math.floor((1.0 - scale * raw[name]) * n[name]))) for name in shapes}


def densities(counts: dict[str, int], shapes: Shapes) -> dict[str, float]:
    return {name: counts[name] / max(1, int(np.prod(shapes[name]))) for name in counts}


def split_capped(total: int, shares: dict[str, float], caps: dict[str, int]) -> dict[str, int]:
    """``total`` split over the keys in proportion to ``shares``, none above its cap, what a capped key cannot
    take going to the others in proportion (water-filling), in integers that sum to min(total, sum of caps)
    (largest remainders, as :func:`_split_exactly`)."""
    total, counts, open_keys = min(total, sum(caps.values())), {key: 0 for key in caps}, set(caps)
    while open_keys:
        left = total - sum(counts.values())
        weight = sum(shares[key] for key in open_keys)
        raw = {key: (shares[key] / weight if weight > 0 else 1 / len(open_keys)) * left for key in open_keys}
        capped = {key for key in open_keys if raw[key] >= caps[key]}
        if not capped:
            split = _split_exactly(left, raw, {key: caps[key] for key in open_keys})
            return {key: counts[key] + split.get(key, 0) for key in caps}
        for key in capped:
            counts[key] = caps[key]
        open_keys -= capped
    return counts
