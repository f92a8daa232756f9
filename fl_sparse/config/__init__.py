"""Composition: gin files by name (:mod:`~fl_sparse.config.gin_files`), the one compose function
(:func:`fl_sparse.config.compose.compose`), the catalogue of parts for ``fl-sparse list`` and the budget rule's
measurement."""
