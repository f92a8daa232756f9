"""Studies: a whole table of experiments as one command (``fl-sparse study run FILE``), resumable, on this
machine's cores or a Ray cluster. The file format is :mod:`~fl_sparse.studies.spec`; one trial's run is
:mod:`~fl_sparse.studies.trial`; the driver and its engines are :mod:`~fl_sparse.studies.driver` (serial) and
:mod:`~fl_sparse.studies.tune_engine` (Ray Tune, the only importer of Ray here)."""
