"""Powerprop re-parameterisation with activation pruning: SparsyFed's model side (Guastella et al., ICLR 2025).

Every convolution and linear layer keeps its parameter ``v`` under the usual name (``conv1.weight``), so
masks, codecs and checkpoints see the same tensors as without it, and computes with the effective
weight ``w = sign(v) * |v| ** beta`` (Powerpropagation, Schwarz et al. 2021). The gradient w.r.t. ``v``
is ``beta * |v| ** (beta - 1)`` times that w.r.t. ``w``: small weights learn slowly and a weight at exactly
0 never moves, so pruned weights stay pruned without a mask.

Activation pruning (SWAT-style): in training, each layer saves for its backward pass only the largest
entries of its input, by magnitude, keeping the fraction of the input equal to the layer's weight density.
That fraction is measured on the effective weight at every step, as the reference code does. Only the
weight gradient uses the pruned input. The forward pass and the input gradient stay exact. The top-k runs
over the whole batch tensor, as in the reference, so the batch is coupled like a BatchNorm batch, and the
Vectorized executor trains such a model sequentially. Evaluation never prunes. ``conv_threshold`` says how
the conv layers cut: ``"per_batch"`` (default) recomputes the threshold for every batch, as the linear layers
always do; ``"first_batch"`` keeps, for every later batch of a client's round, the threshold of its first
batch, which is what every version of the SparsyFed code does in its conv layers (the paper does not say).
"""

from __future__ import annotations

import math

import gin
import torch
import torch.nn.functional as F
from torch import nn

from fl_sparse.core.errors import check
from fl_sparse.core.interfaces import ModelReparameterization


class _EffectiveWeight(torch.autograd.Function):
    """``w = v * |v| ** (beta - 1)`` with the hand-written gradient ``beta * |v| ** (beta - 1)``: one ``pow``
    in all, where autograd of ``sign(v) * |v| ** beta`` needed two and four more passes over the tensor
    (LeNet's fc1 has 768k weights, re-parameterised at every step). Autograd of the product form would
    give 0 * inf = NaN at v = 0; this gradient is exactly 0 there."""

    generate_vmap_rule = True  # plain tensor ops: the vectorized executor can batch it

    @staticmethod
    def forward(v, beta):
        scale = v.abs().pow(beta - 1.0)
        return v * scale, scale

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.beta = inputs[1]
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])

    @staticmethod
    def backward(ctx, grad_w, _):
        (scale,) = ctx.saved_tensors
        return grad_w * scale * ctx.beta, None


def effective_weight(v: torch.Tensor, beta: float) -> torch.Tensor:
    """``sign(v) * |v| ** beta``, computed as ``v * |v| ** (beta - 1)`` (see :class:`_EffectiveWeight`)."""
    return v if beta == 1.0 else _EffectiveWeight.apply(v, beta)[0]


def magnitude_threshold(x: torch.Tensor, density: float) -> torch.Tensor | None:
    """The magnitude of ``x``'s ``ceil(density * numel)``-th largest entry (None when everything is kept)."""
    if density >= 1.0:
        return None
    keep = max(1, math.ceil(density * x.numel()))
    magnitudes = x.detach().abs().flatten()
    return magnitudes.kthvalue(magnitudes.numel() - keep + 1).values


def keep_largest(x: torch.Tensor, density: float, threshold: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` with all but its ``ceil(density * numel)`` largest-magnitude entries set to 0 (entries tied
    with the smallest kept one are kept too); with ``threshold``, every entry below that magnitude is cut."""
    threshold = magnitude_threshold(x, density) if threshold is None else threshold
    return x if threshold is None else x * (x.detach().abs() >= threshold)


def _density(weight: torch.Tensor) -> float:
    """Fraction of non-zero weights. A host sync per layer and training step: free on a CPU, a small stall
    on a GPU, where a sort-based threshold could avoid it."""
    return int(torch.count_nonzero(weight)) / weight.numel()


class _PrunedInputConv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, density, stride, padding, dilation, groups, threshold=None):
        ctx.save_for_backward(keep_largest(x, density, threshold), weight)
        ctx.conv = (stride, padding, dilation, groups, bias is not None)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad_out):
        pruned_x, weight = ctx.saved_tensors
        stride, padding, dilation, groups, has_bias = ctx.conv
        needs = [ctx.needs_input_grad[0], ctx.needs_input_grad[1], has_bias and ctx.needs_input_grad[2]]
        # The input gradient depends on the input's shape only, so passing the pruned input keeps it exact.
        grad_x, grad_w, grad_b = torch.ops.aten.convolution_backward(
            grad_out, pruned_x, weight, [weight.shape[0]] if has_bias else None, stride, padding, dilation,
            False, [0] * len(stride), groups, needs)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None


class _PrunedInputLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, density):
        ctx.save_for_backward(keep_largest(x, density), weight)
        ctx.has_bias = bias is not None
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out):
        pruned_x, weight = ctx.saved_tensors
        grad_x = grad_out @ weight if ctx.needs_input_grad[0] else None
        grad_w = grad_out.flatten(0, -2).T @ pruned_x.flatten(0, -2) if ctx.needs_input_grad[1] else None
        grad_b = grad_out.flatten(0, -2).sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b, None


class _PowerpropLayer:
    """What both Powerprop layers share; set per instance by :class:`Powerprop`."""

    beta: float = 1.0
    prune_activations: bool = False
    activation_density: float | None = None  # None: the layer's weight density (SWAT); else this fraction
    normalized: bool = False  # a normalised sparse convolution (fl_sparse.models.normalized)

    def _activation_density(self, weight: torch.Tensor) -> float:
        return _density(weight) if self.activation_density is None else self.activation_density

    @property
    def uses_batch_statistics(self) -> bool:
        return self.prune_activations

    def _prunes_now(self) -> bool:
        return self.prune_activations and self.training and torch.is_grad_enabled()


class PowerpropConv2d(_PowerpropLayer, nn.Conv2d):
    """``nn.Conv2d`` computing with ``effective_weight(self.weight, beta)``; see the module docstring. With
    ``threshold_from_first_batch`` the activation threshold of a client's first batch of the round is kept
    for its later batches (SparsyFed's code), until :meth:`Powerprop.start_local_training` clears it."""

    threshold_from_first_batch: bool = False
    first_threshold: torch.Tensor | None = None

    def computed_weight(self) -> torch.Tensor:
        """The weight the convolution computes with (a subclass may transform it further)."""
        return effective_weight(self.weight, self.beta)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.computed_weight()
        if not self._prunes_now():
            return self._conv_forward(x, weight, self.bias)
        density, threshold = self._activation_density(weight), None
        if self.threshold_from_first_batch:
            if self.first_threshold is None:
                self.first_threshold = magnitude_threshold(x, density)
            threshold = self.first_threshold
        return _PrunedInputConv2d.apply(x, weight, self.bias, density, self.stride, self.padding,
                                        self.dilation, self.groups, threshold)


class PowerpropLinear(_PowerpropLayer, nn.Linear):
    """``nn.Linear`` computing with ``effective_weight(self.weight, beta)``; see the module docstring."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = effective_weight(self.weight, self.beta)
        if not self._prunes_now():
            return F.linear(x, weight, self.bias)
        return _PrunedInputLinear.apply(x, weight, self.bias, self._activation_density(weight))


@gin.configurable
class Powerprop(ModelReparameterization):
    """Turns a model's ``nn.Conv2d`` / ``nn.Linear`` layers into their Powerprop versions, in place.

    The parameters are re-initialised as ``v = sign(w0) * |w0| ** (1 / beta)`` from initial weights ``w0``,
    so the effective weights start at ``w0``. ``init = "base"`` (default) takes ``w0`` from the model as built
    (PyTorch's default, std 1/sqrt(3 fan_in)); ``init = "truncated_normal"`` first redraws every conv and
    linear weight from a normal of std 1/sqrt(fan_in) truncated at two standard deviations, SparsyFed's
    initialisation (1.7x the default's spread; the truncation at 2 std is the Powerprop reference's Haiku
    initialiser, not checked in SparsyFed's PyTorch code). Gin: ``Experiment.reparameterization = @Powerprop()``.

    A normalised sparse convolution (:class:`~fl_sparse.models.normalized.NormalizedConv2d`, already a Powerprop
    layer) gets the same settings unless ``normalized_convs=False``, which leaves it alone as FedMef's code does:
    it attaches activation pruning by exact module type, so its normalised convolutions never get it.
    """

    LAYERS = {nn.Conv2d: PowerpropConv2d, nn.Linear: PowerpropLinear}
    INITS = ("base", "truncated_normal")

    CONV_THRESHOLDS = ("per_batch", "first_batch")

    def __init__(self, beta: float = 1.25, prune_activations: bool = True, init: str = "base",
                 conv_threshold: str = "per_batch", normalized_convs: bool = True):
        check(beta >= 1.0, f"Powerprop.beta={beta} must be >= 1 (SparsyFed uses 1.25; 1 is no re-parameterisation)")
        check(init in self.INITS, f"Powerprop.init={init!r} must be one of {', '.join(map(repr, self.INITS))}")
        check(conv_threshold in self.CONV_THRESHOLDS, f"Powerprop.conv_threshold={conv_threshold!r} must be "
                                                      f"one of {', '.join(map(repr, self.CONV_THRESHOLDS))}")
        self.beta, self.prune_activations, self.init = float(beta), bool(prune_activations), init
        self.conv_threshold, self.normalized_convs = conv_threshold, bool(normalized_convs)
        self.activation_density: float | None = None  # the layer's weight density (see ActivationPruning)

    def __repr__(self) -> str:
        return (f"Powerprop(beta={self.beta}, prune_activations={self.prune_activations}, init={self.init!r}, "
                f"conv_threshold={self.conv_threshold!r}, normalized_convs={self.normalized_convs})")

    def start_local_training(self, model: nn.Module) -> None:
        """A client's round starts: its conv layers forget the previous client's first-batch threshold."""
        for module in model.modules():
            if isinstance(module, PowerpropConv2d):
                module.first_threshold = None

    def __call__(self, model: nn.Module) -> nn.Module:
        for module in model.modules():
            if getattr(module, "normalized", False):  # keeps its class: the standardisation stays on top
                powerprop_class = type(module) if self.normalized_convs else None
            else:
                powerprop_class = self.LAYERS.get(type(module))
            if powerprop_class is None:
                continue
            check(not self.prune_activations or getattr(module, "padding_mode", "zeros") == "zeros",
                  f"Powerprop.prune_activations supports padding_mode='zeros' only, not {module!r}; "
                  "set Powerprop.prune_activations = False")
            module.__class__ = powerprop_class  # a subclass adding no state: the parameters stay as they are
            module.beta, module.prune_activations = self.beta, self.prune_activations
            module.activation_density = self.activation_density
            if isinstance(module, PowerpropConv2d):
                module.threshold_from_first_batch = self.conv_threshold == "first_batch"
            with torch.no_grad():
                if self.init == "truncated_normal":  # drawn from torch's global generator, seeded per run
                    std = 1.0 / math.sqrt(module.weight[0].numel())  # fan_in = in_channels * kernel area
                    nn.init.trunc_normal_(module.weight, std=std, a=-2.0 * std, b=2.0 * std)
                module.weight.copy_(torch.sign(module.weight) * module.weight.abs().pow(1.0 / self.beta))
        return model


@gin.configurable
class ActivationPruning(Powerprop):
    """FedMef's scaled activation pruning (Huang et al., CVPR 2024) without Powerprop: in training, each conv and
    linear layer saves for its backward pass only the ``keep`` largest-magnitude entries of its input (FedMef's
    research code: 1 - gamma with gamma = 0.7, so 0.3), a fixed fraction rather than the layer's weight density.
    The forward output and the input gradient stay exact; only the weight gradient uses the pruned input, which
    is what saves activation memory. Evaluation never prunes. Gin:
    ``Experiment.reparameterization = @ActivationPruning()``. ``normalized_convs`` (default True): normalised
    sparse convolutions are pruned too; False copies FedMef's code, where they never are (see :class:`Powerprop`)."""

    def __init__(self, keep: float = 0.3, normalized_convs: bool = True):
        check(0.0 < keep <= 1.0, f"ActivationPruning.keep={keep} must lie in (0, 1] (FedMef: 1 - 0.7 = 0.3)")
        super().__init__(beta=1.0, prune_activations=True, normalized_convs=normalized_convs)
        self.activation_density = float(keep)

    def __repr__(self) -> str:
        return f"ActivationPruning(keep={self.activation_density}, normalized_convs={self.normalized_convs})"
