"""Exact prune / grow primitives. Policies decide when and to what count; these do the arithmetic.

Both primitives work per tensor with an exact target count and never overlap:

* :func:`prune_to` keeps the ``count`` highest-scoring active coordinates (frozen ones always stay and
  count towards ``count``) and zeroes every weight it drops.
* :func:`grow_to` activates the highest-scoring *inactive* coordinates until ``count`` are active;
  grown weights are set to exactly 0 and active weights are never touched.

Ties are broken by the lower flat index (a stable sort), so results are deterministic. Calling either
again with the same count changes nothing. :func:`prune_to` can instead break ties by a seeded random draw
(``tie_break``): the lower-index rule is a positional bias wherever many coordinates tie, e.g. the
zero-valued weights FedDST's server must keep to reach its count.
"""

from __future__ import annotations

import torch

Tensors = dict[str, torch.Tensor]


Secondary = torch.Tensor | tuple[torch.Tensor, ...]


def _top_positions(scores: torch.Tensor, eligible: torch.Tensor, k: int,
                   tie_break: torch.Generator | None = None, secondary: Secondary | None = None) -> torch.Tensor:
    """Flat indices of the k highest scores among eligible coordinates. The lower index wins ties, or, with
    ``tie_break``, a uniformly random subset of the tied coordinates drawn from that generator, or, with
    ``secondary`` (one tensor or several, compared in order), the higher secondary score (then the lower
    index)."""
    candidates = eligible.flatten().nonzero().squeeze(1)
    if k <= 0 or candidates.numel() == 0:
        return candidates[:0]
    if k >= candidates.numel():
        return candidates
    candidate_scores = scores.flatten()[candidates].float()
    # The k-th largest score splits the candidates; among those equal to it, the lowest indices win.
    # Same result as a stable descending sort, without sorting all candidates.
    threshold = torch.topk(candidate_scores, k, sorted=False).values.min()
    above = candidate_scores > threshold
    ties = (candidate_scores == threshold).nonzero().squeeze(1)
    needed = k - int(above.sum())
    if secondary is not None and ties.numel() > needed:
        # Stable sorts from the last key to the first order the ties by the keys lexicographically.
        for key in reversed(secondary if isinstance(secondary, tuple) else (secondary,)):
            tied_scores = key.flatten()[candidates[ties]].float()
            ties = ties[torch.sort(tied_scores, descending=True, stable=True).indices]
    elif tie_break is not None and ties.numel() > needed:
        ties = ties[torch.randperm(ties.numel(), generator=tie_break).to(ties.device)]
    ties = ties[:needed]
    chosen = above.clone()
    chosen[ties] = True
    return candidates[chosen]


def prune_to(weights: Tensors, mask: Tensors, counts: dict[str, int], frozen: Tensors | None = None,
             scores: Tensors | None = None, tie_break: torch.Generator | None = None,
             secondary: dict[str, Secondary] | None = None) -> tuple[Tensors, Tensors]:
    """Keep exactly ``counts[name]`` active coordinates per masked tensor (fewer if fewer are active).

    Scores default to |weight|. Frozen coordinates are always kept. Ties at the cut go to the lower flat
    index, or with ``tie_break`` to a random draw from that generator (tensors in ``mask`` order), or with
    ``secondary`` to the higher secondary score of the tensor (a tuple: compared key by key; then the lower index).
    """
    frozen = frozen or {}
    new_weights, new_mask = dict(weights), dict(mask)
    for name, active in mask.items():
        if int(active.sum()) <= counts[name]:
            continue
        locked = frozen.get(name, torch.zeros_like(active))
        score = (scores or {}).get(name, weights[name].abs())
        keep_free = max(0, counts[name] - int(locked.sum()))
        kept = _top_positions(score, active & ~locked, keep_free, tie_break, (secondary or {}).get(name))
        pruned_mask = locked.clone().flatten()
        pruned_mask[kept] = True
        pruned_mask = pruned_mask.view_as(active)
        new_mask[name] = pruned_mask
        new_weights[name] = torch.where(pruned_mask, weights[name], torch.zeros_like(weights[name]))
    return new_weights, new_mask


def prune_globally_to(weights: Tensors, mask: Tensors, names: list[str], count: int,
                      frozen: Tensors | None = None) -> tuple[Tensors, Tensors]:
    """Keep exactly ``count`` active coordinates over the tensors ``names`` taken together, by |weight|: one
    threshold shared by all of them (global magnitude pruning), not a count per tensor. Frozen coordinates
    always stay and count; ties go to the earlier tensor in ``names``, then the lower flat index. Tensors
    of ``mask`` not in ``names`` are left alone."""
    frozen = frozen or {}
    if sum(int(mask[name].sum()) for name in names) <= count:
        return dict(weights), dict(mask)
    locked = [frozen.get(name, torch.zeros_like(mask[name])).flatten() for name in names]
    eligible = torch.cat([(mask[name].flatten() & ~lock) for name, lock in zip(names, locked)])
    scores = torch.cat([weights[name].abs().flatten() for name in names])
    kept = torch.cat(locked)
    kept[_top_positions(scores, eligible, max(0, count - int(kept.sum())))] = True
    new_weights, new_mask = dict(weights), dict(mask)
    for name, piece in zip(names, kept.split([mask[name].numel() for name in names])):
        new_mask[name] = piece.view_as(mask[name])
        new_weights[name] = torch.where(new_mask[name], weights[name], torch.zeros_like(weights[name]))
    return new_weights, new_mask


def grow_to(weights: Tensors, mask: Tensors, counts: dict[str, int], scores: Tensors,
            exclude: Tensors | None = None, tie_break: torch.Generator | None = None) -> tuple[Tensors, Tensors]:
    """Activate the highest-scoring inactive coordinates until ``counts[name]`` are active.

    Grown weights start at exactly 0; active coordinates keep their value bitwise. Coordinates in
    ``exclude`` are never grown (FedDST excludes what the client just pruned, so a weight that was
    active this round is never reset to 0). Ties go to the lower index, or with ``tie_break`` to a random
    draw from that generator.
    """
    new_weights, new_mask = dict(weights), dict(mask)
    for name, active in mask.items():
        missing = counts[name] - int(active.sum())
        if missing <= 0:
            continue
        eligible = ~active if exclude is None or name not in exclude else ~active & ~exclude[name]
        grown = _top_positions(scores[name], eligible, missing, tie_break)
        grown_mask = active.clone().flatten()
        grown_mask[grown] = True
        new_mask[name] = grown_mask.view_as(active)
        flat = weights[name].clone().flatten()
        flat[grown] = 0.0
        new_weights[name] = flat.view_as(weights[name])
    return new_weights, new_mask


def random_scores(mask: Tensors, generator: torch.Generator) -> Tensors:
    """Uniform random scores: growing by them is RandomGrow."""
    return {name: torch.rand(m.shape, generator=generator).to(m.device) for name, m in mask.items()}


def active_counts(mask: Tensors) -> dict[str, int]:
    return {name: int(m.sum()) for name, m in mask.items()}


def apply_mask(weights: Tensors, mask: Tensors) -> Tensors:
    """Weights with every coordinate outside the mask set to exactly +0.0."""
    out = dict(weights)
    for name, m in mask.items():
        out[name] = torch.where(m, weights[name], torch.zeros_like(weights[name]))
    return out


def trainable(mask: Tensors, frozen: Tensors) -> Tensors:
    """Coordinates local training may change: in the mask and not frozen (derived, never stored)."""
    return {name: (m & ~frozen[name]) if name in frozen else m for name, m in mask.items()}
