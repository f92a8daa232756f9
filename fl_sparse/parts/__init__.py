"""Concrete, gin-registered parts. Importing this package registers all of them with gin.

Executors live in :mod:`fl_sparse.parts.executors`; Ray is imported only by its Ray executor's module, and only
when that executor starts."""

from fl_sparse.parts import (  # noqa: F401  (imported for their gin registrations)
    aggregators,
    budget_rule,
    codecs,
    fedtiny,
    flash,
    freezing,
    mask_policies,
    objectives,
    prunefl,
    schedules,
)
from fl_sparse.parts.executors import ray_executor, sequential, vectorized  # noqa: F401
