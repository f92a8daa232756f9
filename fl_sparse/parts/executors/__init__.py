"""Client executors: where and how the sampled clients of a round train (never what they compute).

* :class:`~fl_sparse.parts.executors.sequential.Sequential`  one client after another.
* :class:`~fl_sparse.parts.executors.vectorized.Vectorized`  a group of clients at once under ``torch.func.vmap``.
* :class:`~fl_sparse.parts.executors.ray_executor.RayExecutor`  clients in parallel Ray workers (the ``ray`` extra).
"""
