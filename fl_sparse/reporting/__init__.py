"""Reporting: pure functions over run records (:mod:`~fl_sparse.reporting.records`, the text export format), the
tables (:mod:`~fl_sparse.reporting.summary`, :mod:`~fl_sparse.reporting.reach`), the plots (matplotlib, in
:mod:`~fl_sparse.reporting.plots` only) and the paper's numbers (``paper_numbers.toml``)."""
