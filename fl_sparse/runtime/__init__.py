"""Running experiments: :func:`~fl_sparse.runtime.runner.run` (resume, checkpoints, callbacks with a declared
lifecycle, :mod:`fl_sparse.runtime.callbacks`) and the progress bar."""
