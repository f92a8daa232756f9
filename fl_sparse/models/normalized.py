"""FedMef's normalised sparse convolution in place of BatchNorm (Huang et al., CVPR 2024), and a chain of
re-parameterisations.

Each convolution that a BatchNorm follows computes with, per output channel c, the standardised masked weight
times a learnable gain ``g_c`` (initialised to 1; the convolution keeps its own bias)::

    w_eff[c] = g_c * (w[c] - mean_c) / sqrt(max(fan_in * var_c, 1e-4)) * m[c]

with ``m = (w != 0)`` (masked weights are exactly 0 here), ``fan_in`` the kernel's in_channels * height * width,
and ``mean_c``, ``var_c`` (unbiased) over the channel's active weights (``statistics="active"``) or over all of
its entries, zeros included (``"all"``). So ``sqrt(fan_in) * w_eff[c] / g_c`` has mean 0 and standard deviation 1
over the active weights: the scaled weight standardisation of NF-Nets (Brock et al. 2021), which keeps the output
variance near the input's without a BatchNorm. The BatchNorm is removed, and with it its running statistics.

Source: FedMef's research code, Little0o0/FedML branch ``aaai`` @ 6e704fd3, ``fedml_api/model/cv/nfnets/model.py``
``WSConv2D`` (lines 239-279): gain ``ones(out_channels)``, eps 1e-4 on ``var * fan_in``, unbiased variance;
its active code standardises over all entries and then multiplies by the mask (line 262-268, our ``"all"``),
with the active-only statistics commented out beside it (lines 255-260, our default ``"active"``).

One deliberate difference: an active weight at exactly 0 (grown this round) counts as pruned in the forward
pass, as there, but its gradient is the one it would get as an active weight (``g_c / sqrt(fan_in * var_c)``
times the output's), where the research code's is only the small share it gets through the channel's mean and
variance, the same for every zero of the channel. Without this a grown weight would never leave 0 under
``"active"``, and growth scores read at pruned positions would not tell them apart within a channel. The
optimiser's mask still keeps pruned weights at 0. The gradient of the statistics and of the gain comes from the
active weights only.
"""

from __future__ import annotations

import gin
import torch
from torch import nn

from fl_sparse.core.errors import ConfigError, check
from fl_sparse.core.interfaces import ModelReparameterization
from fl_sparse.models.powerprop import PowerpropConv2d, effective_weight

#: The floor on ``fan_in * var`` (the research code's ``eps``): a channel with one active weight, or with equal
#: ones, gets a finite scale.
EPS = 1e-4
STATISTICS = ("active", "all")


def standardized_weight(weight: torch.Tensor, gain: torch.Tensor, statistics: str = "active") -> torch.Tensor:
    """``weight`` (out_channels first) standardised per output channel, times ``gain``, zero where ``weight`` is;
    see the module docstring for the formula and the gradient at zero weights."""
    flat = weight.reshape(weight.shape[0], -1)
    fan_in = flat.shape[1]
    gate = (flat != 0).to(flat.dtype).detach()
    if statistics == "active":
        count = gate.sum(1, keepdim=True)
        mean = (flat * gate).sum(1, keepdim=True) / count.clamp(min=1)
        var = ((flat - mean) * gate).square().sum(1, keepdim=True) / (count - 1).clamp(min=1)
    else:
        mean, var = flat.mean(1, keepdim=True), flat.var(1, keepdim=True)
    scale = torch.rsqrt(torch.clamp(var * fan_in, min=EPS)) * gain.reshape(-1, 1)
    active = (flat - mean) * scale * gate
    # 0 in value; at zero weights the gradient an active weight would get, and nothing into mean, var or gain.
    grow = (flat - flat.detach()) * (1 - gate) * scale.detach()
    return (active + grow).reshape(weight.shape)


class NormalizedConv2d(PowerpropConv2d):
    """A convolution computing with :func:`standardized_weight` of its (Powerprop-effective) weight. Built by
    :class:`NormalizedSparseConv` from an ``nn.Conv2d``; activation pruning applies to it like to any Powerprop
    layer (``prune_activations``)."""

    normalized = True
    statistics: str = "active"
    gain: nn.Parameter

    def computed_weight(self) -> torch.Tensor:
        return standardized_weight(effective_weight(self.weight, self.beta), self.gain, self.statistics)


@gin.configurable
class NormalizedSparseConv(ModelReparameterization):
    """FedMef's normalised sparse convolution: every ``nn.Conv2d`` whose output goes straight into a
    ``BatchNorm2d`` becomes a :class:`NormalizedConv2d` with a per-channel ``gain`` (named ``<conv>.gain``, dense,
    never masked), and that BatchNorm becomes ``nn.Identity`` (its parameters and running statistics leave the
    model). The pairs are found by one forward pass of a zero batch of ``input_shape`` in evaluation mode; a
    BatchNorm that follows anything else stays. The conv weights keep their names, shapes and initialisation.
    On LeNetBN: 782,028 parameters for 10 classes (LeNet's 782,006 + 6 + 16 gains). Gin:
    ``Experiment.reparameterization = @NormalizedSparseConv()``; with activation pruning too, chain them with
    :class:`Reparameterizations`."""

    def __init__(self, statistics: str = "active", input_shape: tuple[int, ...] = (3, 32, 32)):
        check(statistics in STATISTICS, f"NormalizedSparseConv.statistics={statistics!r} must be one of "
                                        f"{', '.join(map(repr, STATISTICS))}")
        check(len(input_shape) == 3 and all(isinstance(n, int) and n >= 1 for n in input_shape),
              f"NormalizedSparseConv.input_shape={input_shape!r} must be (channels, height, width)")
        self.statistics, self.input_shape = statistics, tuple(input_shape)

    def __repr__(self) -> str:
        return f"NormalizedSparseConv(statistics={self.statistics!r}, input_shape={self.input_shape})"

    def __call__(self, model: nn.Module) -> nn.Module:
        pairs = conv_batchnorm_pairs(model, self.input_shape)
        if not pairs:
            raise ConfigError(f"NormalizedSparseConv: {type(model).__name__} has no convolution followed by a "
                              "BatchNorm2d; use a model with them (e.g. Experiment.model = @LeNetBN)")
        for conv_name, bn_name in pairs:
            conv = model.get_submodule(conv_name)
            if not isinstance(conv, NormalizedConv2d):  # a Powerprop conv keeps its settings as instance state
                conv.__class__ = NormalizedConv2d
            conv.statistics = self.statistics
            conv.gain = nn.Parameter(torch.ones(conv.out_channels, device=conv.weight.device,
                                                dtype=conv.weight.dtype))
            parent, _, child = bn_name.rpartition(".")
            setattr(model.get_submodule(parent), child, nn.Identity())
        return model


def conv_batchnorm_pairs(model: nn.Module, input_shape: tuple[int, ...]) -> list[tuple[str, str]]:
    """(conv name, BatchNorm name) for each ``BatchNorm2d`` whose input is exactly a ``Conv2d``'s output, found
    by running ``model`` once on a zero batch (in evaluation mode, so no running statistic moves)."""
    outputs: dict[int, tuple[str, torch.Tensor]] = {}  # the tensors stay referenced, so no id is reused
    pairs: list[tuple[str, str]] = []

    def conv_hook(name: str):
        return lambda _module, _inputs, out: outputs.__setitem__(id(out), (name, out))

    def batchnorm_hook(name: str):
        def hook(_module, inputs, _out):
            conv = outputs.get(id(inputs[0]))
            if conv is not None and conv[1] is inputs[0]:
                pairs.append((conv[0], name))
        return hook

    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(conv_hook(name)))
        elif isinstance(module, nn.BatchNorm2d):
            hooks.append(module.register_forward_hook(batchnorm_hook(name)))
    was_training = model.training
    try:
        parameter = next(model.parameters())
        with torch.no_grad():
            model.eval()(torch.zeros(2, *input_shape, device=parameter.device, dtype=parameter.dtype))
    finally:
        model.train(was_training)
        for hook in hooks:
            hook.remove()
    convs = dict(model.named_modules())
    return [(c, b) for c, b in pairs if convs[c].out_channels == convs[b].num_features]


@gin.configurable
class Reparameterizations(ModelReparameterization):
    """Several re-parameterisations applied in order, e.g. FedMef's normalised sparse convolution and then its
    activation pruning: ``Reparameterizations.parts = [@NormalizedSparseConv(), @ActivationPruning()]``."""

    def __init__(self, parts: list = ()):
        check(len(parts) > 0 and all(isinstance(p, ModelReparameterization) for p in parts),
              f"Reparameterizations.parts={parts!r} must list re-parameterisations, e.g. [@NormalizedSparseConv()]")
        self.parts = list(parts)

    def __repr__(self) -> str:
        return f"Reparameterizations(parts={self.parts!r})"

    def __call__(self, model: nn.Module) -> nn.Module:
        for part in self.parts:
            model = part(model)
        return model

    def start_local_training(self, model: nn.Module) -> None:
        for part in self.parts:
            part.start_local_training(model)
