"""The core: the part interfaces (:mod:`~fl_sparse.core.interfaces`), the state types
(:mod:`~fl_sparse.core.state`), user-facing errors (:mod:`~fl_sparse.core.errors`) and keyed random streams
(:mod:`~fl_sparse.core.rng`). It imports the standard library, numpy and torch only."""
