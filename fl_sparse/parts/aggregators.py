"""Server aggregation: union-mask averaging, optionally followed by a server momentum step (FedAvgM)."""

from __future__ import annotations

import gin
import torch

from fl_sparse.core.errors import check
from fl_sparse.core.interfaces import Aggregator, ClientResult, Tensors


@gin.configurable
class UnionAverage(Aggregator):
    """Each coordinate is averaged over the clients that hold it, weighted by sample count.

    For a dense model every client holds every coordinate, so this is FedAvg. For sparse clients
    whose masks differ (FedDST) a coordinate is divided by the weight of its holders only, and the
    returned mask is the union of the client masks. With ``absent_as_zero`` it is divided by the weight of
    all clients instead, i.e. plain FedAvg of the sparse client models, where a coordinate a client dropped
    counts as 0 (SparsyFed). With ``by_samples = False`` every client weighs the same (FLASH's server). With
    ``server_momentum`` > 0 the mean update
    becomes a server SGD step with momentum (FedAvgM, Hsu et al. 2019):
    ``buf = beta * buf + (w - mean); w -= server_lr * buf``.
    """

    def __init__(self, server_lr: float = 1.0, server_momentum: float = 0.0, absent_as_zero: bool = False,
                 by_samples: bool = True):
        check(server_lr > 0, f"UnionAverage.server_lr={server_lr} must be > 0 (1.0 is plain FedAvg)")
        check(0.0 <= server_momentum < 1.0,
              f"UnionAverage.server_momentum={server_momentum} must lie in [0, 1) (FedAvgM uses 0.9)")
        self.server_lr, self.server_momentum = server_lr, server_momentum
        self.absent_as_zero, self.by_samples = bool(absent_as_zero), bool(by_samples)
        self.momentum_buffers: Tensors = {}

    def aggregate(self, weights, mask, frozen, results: list[ClientResult]):
        sample_weights = [float(max(r.num_samples, 0)) if self.by_samples else 1.0 for r in results]
        if sum(sample_weights) == 0:  # clients without data still vote equally rather than divide by 0
            sample_weights = [1.0] * len(results)
        mean, union = self._union_mean(weights, results, sample_weights, self.absent_as_zero)
        new_weights = self._server_step(weights, mean, union)
        for name, locked in frozen.items():
            new_weights[name] = torch.where(locked, weights[name], new_weights[name])
        return new_weights, union

    @staticmethod
    def _union_mean(weights: Tensors, results: list[ClientResult], sample_weights: list[float],
                    absent_as_zero: bool) -> tuple[Tensors, Tensors]:
        mean, union = {}, {}
        for name, current in weights.items():
            if not current.is_floating_point():  # e.g. BatchNorm's num_batches_tracked
                mean[name] = torch.stack([r.weights[name] for r in results]).max(0).values
                continue
            total = torch.zeros_like(current)
            holders = torch.zeros_like(current)
            for result, weight in zip(results, sample_weights):
                held = result.mask.get(name)
                total += weight * result.weights[name]
                holders += weight if held is None else weight * held
            if any(name in r.mask for r in results):
                union[name] = holders > 0
            if absent_as_zero:  # clients outside a coordinate's mask hold an exact 0 there
                holders = torch.where(holders > 0, torch.full_like(holders, sum(sample_weights)), holders)
            mean[name] = torch.where(holders > 0, total / holders.clamp_min(1e-30), torch.zeros_like(total))
        return mean, union

    def _server_step(self, weights: Tensors, mean: Tensors, union: Tensors) -> Tensors:
        if self.server_momentum == 0.0 and self.server_lr == 1.0:
            return mean  # exact FedAvg, without the rounding of w - (w - mean)
        new = dict(mean)
        for name, current in weights.items():
            if not current.is_floating_point():
                continue
            delta = current - mean[name]
            buffer = self.momentum_buffers.get(name)
            buffer = delta if buffer is None else self.server_momentum * buffer + delta
            if name in union:  # momentum of coordinates outside the new mask is reset, as in RigL
                buffer = torch.where(union[name], buffer, torch.zeros_like(buffer))
            self.momentum_buffers[name] = buffer
            step = current - self.server_lr * buffer
            new[name] = torch.where(union[name], step, torch.zeros_like(step)) if name in union else step
        return new

    def state_dict(self):
        return {f"momentum/{name}": buffer for name, buffer in self.momentum_buffers.items()}

    def load_state_dict(self, state):
        self.momentum_buffers = {key.split("/", 1)[1]: value for key, value in state.items()}
