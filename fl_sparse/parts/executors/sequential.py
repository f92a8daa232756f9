"""Client executors: how the sampled clients of a round are trained (never what they compute).

* :class:`Sequential`  one client after another (:func:`fl_sparse.training.client.train_client`).
* :class:`fl_sparse.parts.executors.vectorized.Vectorized`  a group of clients at once under ``torch.func.vmap``.
"""

from __future__ import annotations

import gin

from fl_sparse.core.interfaces import ClientExecutor
from fl_sparse.training.client import train_client


@gin.configurable
class Sequential(ClientExecutor):
    """Trains the clients one after another: the reference behaviour and the debugging baseline."""

    def train(self, job, tasks, ctx):
        return [train_client(job, task, ctx) for task in tasks]
