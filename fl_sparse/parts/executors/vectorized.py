"""The vectorised client executor: a group of clients trained at once under ``torch.func.vmap``.

:class:`Vectorized` computes, for every client, what :func:`fl_sparse.training.client.train_client` computes
(same batch order, masks, objective, optimiser and mask-policy client step), but steps all clients of a
group together: parameters, global parameters, trainable sets, optimiser state and batches are stacked
along a new leading client dimension, and one vmapped ``grad_and_value`` of a
``functional_call`` per step replaces one call per client and batch.

Padding. Clients hold different numbers of samples, so they take different numbers of steps, and the
last batch of every epoch may be short. The executor pads every client to the group's largest number of
steps and every batch to the largest batch, then masks the padding out:

* each sample carries a weight, ``1 / (number of real samples in its batch)`` for a real sample and 0
  for a padding sample (a copy of one of the client's own samples, so its loss stays finite);
* the batch loss is ``sum_i w_i * loss_i`` where ``loss_i`` is ``objective.loss`` evaluated on sample i
  as a batch of one (an inner vmap over the samples). For any objective that is a per-sample mean plus
  terms of the parameters alone (the :class:`~fl_sparse.core.interfaces.LocalObjective` contract, "mean loss
  of one batch"; true of CrossEntropy, Proximal, label smoothing, L2 terms) this is exactly the
  objective's value on the real samples, so the gradients are the ones ``train_client`` takes. The
  parameter terms (FedProx's penalty) do not depend on the inner vmap's inputs, so they are evaluated
  once per client, not once per sample. An objective that couples the samples of a batch (a batch-level
  statistic) is outside that contract and should run with Sequential;
* a client whose step is all padding does not step: ``torch.where`` on a per-client "active" flag keeps
  its parameters and optimiser state bitwise unchanged.

The mask policy's client step then runs per client, in task order, with a ``gradients()`` closure;
the first call computes the mean gradient over the data of *every* client of the group in one vmapped
pass (FedDST's readjustment calls it for each client anyway) and later calls reuse it.

Models with BatchNorm fall back to :class:`~fl_sparse.parts.executors.Sequential`: batch statistics
would include the padding samples, and vmap cannot update running statistics in place. So do models
whose other normalisation layers track running statistics, and models with active dropout (see
:func:`needs_sequential`). The fallback is silent and exact: ResNet-18 always trains sequentially.

Results equal Sequential's up to float rounding (summation order differs under vmap; measured weight
differences are ~1e-7 after a round, see ``tests/test_executors.py``). An empty client (no samples)
does not train and keeps its weights, where ``train_client`` would produce NaNs.

Gin::

    Experiment.executor = @Vectorized()
    Vectorized.group_size = 0        # clients per vmapped group; 0 = all clients of the round at once
    Vectorized.compile = False       # torch.compile the step (slow first round, faster afterwards on CPU)

Measured speeds (``docs/benchmarks.md``): on a 2-core CPU the eager path runs LeNet at about 0.45x of
Sequential's speed, ``compile=True`` at about 0.7x. Under vmap each convolution becomes a grouped NCHW
convolution, and the stacked optimiser tensors stream through memory. On that CPU a batch of 640 trains
no faster per sample than a batch of 32, so stacking clients has nothing to gain there. It is meant for
accelerators, where it has not been measured yet.
"""

from __future__ import annotations

import logging

import gin
import torch
from torch import nn
from torch.func import functional_call, grad, grad_and_value, vmap

from fl_sparse.core.errors import check
from fl_sparse.core.interfaces import ClientExecutor, ClientResult, RoundContext, Tensors
from fl_sparse.parts.executors.sequential import Sequential
from fl_sparse.sparse.mask_ops import trainable
from fl_sparse.training.client import ClientTask, TrainingJob, batch_order, mask_update

log = logging.getLogger(__name__)


def needs_sequential(model: nn.Module) -> bool:
    """True when padding or vmap would change the model's math, so :class:`Vectorized` runs it sequentially:
    BatchNorm (batch statistics would include the padding; running statistics are updated in place) or any
    norm layer tracking running statistics, any layer whose ``uses_batch_statistics`` is true (a top-k over
    the batch), and active dropout (its draws come from the global generator one client after another,
    which no vmapped draw reproduces)."""
    from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
    from torch.nn.modules.dropout import _DropoutNd

    return any(isinstance(m, _BatchNorm) or (isinstance(m, _NormBase) and m.track_running_stats)
               or (isinstance(m, _DropoutNd) and m.p > 0 and m.training)
               or getattr(m, "uses_batch_statistics", False)  # e.g. Powerprop's activation pruning
               for m in model.modules())


@gin.configurable
class Vectorized(ClientExecutor):
    """Trains ``group_size`` clients at a time (0: the whole round) under vmap; see the module docstring.

    ``compile=True`` wraps the per-step function (vmapped gradient, vmapped optimiser step and the
    inactive-client select) and the gradient pass in ``torch.compile``: one compilation per group shape
    (tens of seconds on a small CPU, paid in the first round), then fused kernels. Off by default."""

    def __init__(self, group_size: int = 0, compile: bool = False):
        check(isinstance(group_size, int) and group_size >= 0,
              f"Vectorized.group_size={group_size!r} must be an integer >= 0 (0 = all clients of a round)")
        self.group_size = group_size
        self.compile = bool(compile)
        self._kernels: dict[tuple[int, ...], _Kernels] = {}
        self._logged_fallback = False

    def __repr__(self) -> str:
        return f"Vectorized(group_size={self.group_size}, compile={self.compile})"

    def train(self, job: TrainingJob, tasks: list[ClientTask], ctx: RoundContext) -> list[ClientResult]:
        if not tasks:
            return []
        if (needs_sequential(job.model) or job.mask_policy.client_step_epoch(ctx, job.epochs) < job.epochs
                or job.optimizer.at_round(ctx.phase.round) is not job.optimizer
                or job.objective.at_round(ctx, tasks[0].weights, tasks[0].mask, tasks[0].frozen,
                                          job.mask_policy) is not job.objective):
            if not self._logged_fallback:
                log.info("Vectorized: %s has BatchNorm or dropout, its clients change their mask before the "
                         "last epoch, their learning rate follows a schedule or their objective has a term for "
                         "the round; training them sequentially",
                         type(job.model).__name__)
                self._logged_fallback = True
            return Sequential().train(job, tasks, ctx)
        key = (id(job.model), id(job.objective), id(job.optimizer), id(job.data))
        if key not in self._kernels:  # one set per job, so compiled functions are reused across rounds
            self._kernels = {key: _Kernels(job, self.compile)}
        kernels = self._kernels[key]
        size = self.group_size or len(tasks)
        results = []
        for start in range(0, len(tasks), size):
            results.extend(_train_group(job, kernels, tasks[start:start + size], ctx))
        return results


def _stack(dicts: list[Tensors]) -> Tensors:
    return {name: torch.stack([d[name] for d in dicts]) for name in dicts[0]} if dicts else {}


def _stacked_trainable(tasks: list[ClientTask], params: Tensors) -> Tensors:
    """``mask & ~frozen`` per client as 0/1 in the parameters' dtype, stacked; a name masked for some
    clients only is all-ones elsewhere."""
    per_client = [trainable(task.mask, task.frozen) for task in tasks]
    names = sorted(set().union(*per_client), key=list(params).index)
    return {name: torch.stack([allowed.get(name, torch.ones_like(params[name][0], dtype=torch.bool))
                               for allowed in per_client]).to(params[name].dtype) for name in names}


def _padded_batches(batches: list[list[torch.Tensor]], fill: list[int], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Index tensor [steps, clients, width] (padding = each client's ``fill`` index) and the bool
    tensor of the same shape that marks the real samples."""
    steps = max((len(b) for b in batches), default=0)
    width = max((len(x) for b in batches for x in b), default=0)
    index = torch.empty(steps, len(batches), width, dtype=torch.long, device=device)
    real = torch.zeros(steps, len(batches), width, dtype=torch.bool, device=device)
    for client, client_batches in enumerate(batches):
        index[:, client] = fill[client]
        for step, batch in enumerate(client_batches):  # one slice per batch, never per sample
            index[step, client, :len(batch)] = batch
            real[step, client, :len(batch)] = True
    return index, real


def _sample_loss_fn(job: TrainingJob):
    """Per-client loss ``sum_i w_i * objective(sample i)`` (see the module docstring); vmapped over clients."""
    model, objective = job.model, job.objective

    def loss(params, buffers, global_params, x, y, w):
        logits = functional_call(model, (params, buffers), (x,))
        per_sample = vmap(lambda lg, t: objective.loss(lg[None], t[None], params, global_params))(logits, y)
        return (per_sample * w).sum()

    return loss


def _batch(job: TrainingJob, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images [clients, width, ...] and labels [clients, width] of an index tensor."""
    flat = index.reshape(-1)
    x = job.data.normalize(job.data.train_x[flat])
    return x.view(*index.shape, *x.shape[1:]), job.data.train_y[flat].view(index.shape)


def _keep_inactive(active: torch.Tensor, new: Tensors, old: Tensors) -> Tensors:
    """``new`` where the client stepped, ``old`` (bitwise) where it did not."""
    return {name: torch.where(active.view(-1, *[1] * (t.dim() - 1)), t, old[name]) for name, t in new.items()}


class _Kernels:
    """The vmapped functions of one job: gradient, optimiser step, gradient pass; or one compiled step."""

    def __init__(self, job: TrainingJob, compile: bool):
        loss_fn = _sample_loss_fn(job)
        self.grad_step = vmap(grad_and_value(loss_fn))
        self.opt_step = vmap(job.optimizer.step)
        gradient = vmap(grad(loss_fn))
        self.gradient = torch.compile(gradient, dynamic=False) if compile else gradient
        self.compiled_step = None
        if compile:
            def step(params, state, buffers, global_params, allowed, x, y, w, active, masked: bool):
                grads, loss = self.grad_step(params, buffers, global_params, x, y, w)
                new_params, new_state = self.opt_step(params, grads, state, allowed)
                if masked:  # some client has no real sample at this step: it must not move
                    new_params = _keep_inactive(active, new_params, params)
                    new_state = _keep_inactive(active, new_state, state)
                return new_params, new_state, loss

            self.compiled_step = torch.compile(step, dynamic=False)


class _ChunkedOptimizer:
    """The eager optimiser step: vmapped over chunks of a few clients, written into two alternating buffers.

    One optimiser step on the whole group makes several temporaries per tensor of [clients, ...] that, for
    LeNet's fc1 at 20 clients, are 61 MB each: glibc serves every one with a fresh mmap, and the page
    faults cost more than the arithmetic. Chunks of about 8 MB reuse the heap and stay in cache (on a
    2-core CPU: the optimiser step alone about 2x faster, a LeNet group's epoch 3.25 -> 2.80 s of CPU).
    The arithmetic is the same, element for element."""

    CHUNK_BYTES = 8 << 20

    def __init__(self, opt_step, params: Tensors, state: Tensors):
        clients = next(iter(params.values())).shape[0]
        per_client = max(t[0].numel() * t.element_size() for t in params.values())
        self.chunk = max(1, min(clients, self.CHUNK_BYTES // max(per_client, 1)))
        self.clients, self.opt_step = clients, opt_step
        self.spare: tuple[Tensors, Tensors] | None = None  # buffers the next step writes into

    def __call__(self, params: Tensors, grads: Tensors, state: Tensors, allowed: Tensors,
                 active: torch.Tensor | None) -> tuple[Tensors, Tensors]:
        if self.chunk >= self.clients:  # one chunk: no buffers needed
            new_params, new_state = self.opt_step(params, grads, state, allowed)
            if active is not None:
                new_params = _keep_inactive(active, new_params, params)
                new_state = _keep_inactive(active, new_state, state)
            return new_params, new_state
        out_params, out_state = self.spare or ({}, {})
        for start in range(0, self.clients, self.chunk):
            part = slice(start, start + self.chunk)
            cut = lambda tensors: {name: t[part] for name, t in tensors.items()}  # noqa: E731, B023  (used at once)
            new_params, new_state = self.opt_step(cut(params), cut(grads), cut(state), cut(allowed))
            if active is not None:  # some client has no real sample at this step: it must not move
                new_params = _keep_inactive(active[part], new_params, cut(params))
                new_state = _keep_inactive(active[part], new_state, cut(state))
            for out, new in ((out_params, new_params), (out_state, new_state)):
                for name, t in new.items():
                    if name not in out:
                        out[name] = t.new_empty((self.clients, *t.shape[1:]))
                    out[name][part].copy_(t)
        self.spare = (params, state)  # never the caller's tensors: the group owns its stacked copies
        return out_params, out_state


def _train_group(job: TrainingJob, kernels: _Kernels, tasks: list[ClientTask],
                 ctx: RoundContext) -> list[ClientResult]:
    device = job.data.train_x.device
    split = [job.split(task.weights) for task in tasks]
    params = _stack([p for p, _ in split])
    buffers = _stack([b for _, b in split])  # read-only: models that update buffers run sequentially
    global_params = {name: p.clone() for name, p in params.items()}  # a copy: compiled steps never see aliases
    allowed = _stacked_trainable(tasks, params)
    state = vmap(job.optimizer.init)(params)

    fill = [int(task.indices[0]) if len(task.indices) else 0 for task in tasks]
    index, real = _padded_batches([batch_order(task, job.epochs, job.batch_size) for task in tasks], fill, device)
    counts = real.sum(-1, keepdim=True)
    weights = real.float() / counts.clamp(min=1)  # the mean over the real samples of each batch
    active = counts.squeeze(-1) > 0  # [steps, clients]: the client has a real batch at this step
    all_active, any_active = active.all(1).tolist(), active.any(1).tolist()

    optimizer = _ChunkedOptimizer(kernels.opt_step, params, state)
    losses = []
    for step in range(index.shape[0]):
        if not any_active[step]:  # only clients without data are left (possible only if some client is empty)
            losses.append(torch.zeros(len(tasks), device=device))
            continue
        x, y = _batch(job, index[step])
        if kernels.compiled_step is not None:
            params, state, loss = kernels.compiled_step(params, state, buffers, global_params, allowed, x, y,
                                                        weights[step], active[step], not all_active[step])
        else:
            grads, loss = kernels.grad_step(params, buffers, global_params, x, y, weights[step])
            params, state = optimizer(params, grads, state, allowed, None if all_active[step] else active[step])
        losses.append(loss.detach())

    steps_taken = active.sum(0)
    loss_table = torch.stack(losses) if losses else torch.zeros(0, len(tasks), device=device)
    mean_loss = (loss_table * active).sum(0) / steps_taken.clamp(min=1)
    mean_loss = torch.where(steps_taken > 0, mean_loss, torch.full_like(mean_loss, float("nan"))).tolist()

    cache: dict[str, Tensors] = {}

    def group_gradients() -> Tensors:
        """Mean gradient over each client's data at its trained weights, all clients at once."""
        if "grads" not in cache:
            batches = [list(task.indices.split(job.batch_size)) if len(task.indices) else [] for task in tasks]
            index, real = _padded_batches(batches, fill, device)
            sizes = torch.tensor([max(len(task.indices), 1) for task in tasks], device=device)
            sample_weights = real.float() / sizes.view(1, -1, 1)  # the mean over all the client's data
            total = {name: torch.zeros_like(p) for name, p in params.items()}
            for step in range(index.shape[0]):
                x, y = _batch(job, index[step])
                grads = kernels.gradient(params, buffers, global_params, x, y, sample_weights[step])
                for name in total:
                    total[name] += grads[name]
            cache["grads"] = total
        return cache["grads"]

    results = []
    for client, task in enumerate(tasks):
        client_weights = {name: t[client].clone() for name, t in {**params, **buffers}.items()}

        def gradients(client: int = client) -> Tensors:
            return {name: g[client] for name, g in group_gradients().items()}

        client_weights, mask, scores = mask_update(job.mask_policy, ctx, task, client_weights, gradients)
        results.append(ClientResult(task.client_id, client_weights, mask, len(task.indices), mean_loss[client],
                                    scores))
    return results
