"""The engine: an :class:`~fl_sparse.engine.experiment.Experiment` (the gin-bound composition of parts), the
server's round steps (:class:`~fl_sparse.engine.server.RoundServer`) and the loop that plays them with its
stop conditions (:func:`~fl_sparse.engine.loop.run_rounds`)."""
