"""``fl-sparse list``: every gin-registered part, grouped by the interface it implements."""

from __future__ import annotations

import inspect

import gin

import fl_sparse.parts  # noqa: F401  (registers every part)
from fl_sparse.core import interfaces
from fl_sparse.sparse.budgets import DensityBudget

INTERFACES = (interfaces.Aggregator, interfaces.MaskPolicy, interfaces.FreezePolicy, interfaces.CommCodec,
              interfaces.LocalObjective, interfaces.ClientOptimizer, interfaces.ClientExecutor,
              interfaces.SparsitySchedule, interfaces.ModelReparameterization, interfaces.LearningRateSchedule,
              DensityBudget)


def registered_parts() -> dict[str, list[str]]:
    """Every gin-registered part, grouped by the interface it implements, with its parameters."""
    groups = {}
    for base in INTERFACES:
        lines = []
        for cls in sorted(_subclasses(base), key=lambda c: c.__name__):
            if gin.config._REGISTRY.get_match(cls.__name__) is None:
                continue
            lines.append(f"{cls.__name__}({_signature(cls)})")
        groups[base.__name__] = lines
    return groups


def _subclasses(cls: type) -> set[type]:
    found = set()
    for sub in cls.__subclasses__():
        found.add(sub)
        found |= _subclasses(sub)
    return found


def _signature(cls: type) -> str:
    init = getattr(cls.__init__, "__wrapped__", cls.__init__)
    parts = []
    for param in list(inspect.signature(init).parameters.values())[1:]:
        if param.kind in (param.VAR_KEYWORD, param.VAR_POSITIONAL):
            continue
        default = param.default
        if default is inspect.Parameter.empty or default is gin.REQUIRED:
            parts.append(f"{param.name}=<required>")
        else:
            parts.append(f"{param.name}={default!r}")
    return ", ".join(parts)
