"""Concrete, gin-registered parts. Importing this package registers all of them with gin."""

from fl_sparse.parts import (  # noqa: F401  (imported for their gin registrations)
    aggregators,
    codecs,
    executors,
    freezing,
    mask_policies,
    objectives,
    ray_executor,
    schedules,
    vectorized,
)
