"""Freeze policies: which non-zero weights stop being trained and transmitted."""

from __future__ import annotations

import gin
from fl_sparse.interfaces import FreezePolicy


@gin.configurable
class NoFreeze(FreezePolicy):
    """Nothing is ever frozen."""

    def server_step(self, ctx, weights, mask, frozen):
        return frozen


@gin.configurable
class FreezeAtStage(FreezePolicy):
    """PFFDST parameter freezing (Algorithm 2): when a stage of the schedule ends, every non-zero
    weight inside the mask is frozen for the rest of the run. Frozen weights are never trained,
    never pruned and sent to each client only once."""

    def server_step(self, ctx, weights, mask, frozen):
        if not ctx.phase.stage_ends:
            return frozen
        new_frozen = {}
        for name, active in mask.items():
            nonzero = active & (weights[name] != 0)
            new_frozen[name] = nonzero | frozen[name] if name in frozen else nonzero
        return new_frozen
