"""Client training as pure functions (:mod:`~fl_sparse.training.client`) and the FLOP accounting of a round
(:mod:`~fl_sparse.training.accounting`). Executors (:mod:`fl_sparse.parts.executors`) run these."""
