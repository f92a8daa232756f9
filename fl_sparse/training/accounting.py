"""Training FLOPs as in the PFFDST paper's labels (SPEC section 5).

Per sample and layer, a dense step costs ``2 * MACs`` for each of three phases: forward, backward to the
inputs, and the weight gradient. Sparse training scales the forward and input-gradient phases by the
layer's density and the weight-gradient phase by the trainable density (frozen weights skip it).
Conv/linear MACs are counted per weight. Products with no weight operand, such as attention's scores
``q @ k^T`` and values ``softmax(.) @ v``, are counted per module that computes them and always as dense:
no mask applies to them, and their three phases (forward, and the gradients to *both* operands) cost
3 x 2 x MACs, which is what the dense formula gives. Norms, activations, softmax and pooling are
negligible and not counted. See docs/design.md, "Sparse masks on transformers".
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fl_sparse.core.interfaces import Tensors

WEIGHTED = (nn.Conv2d, nn.Linear)  # layers whose products forward_macs counts per weight
WEIGHTLESS = ":weightless"  # key suffix of a module's weightless products, e.g. "blocks.0.attn:weightless"


def forward_macs(model: nn.Module, input_shape: tuple[int, ...] = (3, 32, 32)) -> dict[str, int]:
    """Multiply-accumulates of one forward pass of one sample: per conv/linear weight name, and per module
    that multiplies activations by activations (``"<module>:weightless"``, e.g. a ViT's attention)."""
    macs: dict[str, int] = {}
    running: list[tuple[str, nn.Module]] = []  # the modules whose forward is running, innermost last
    hooks = []

    def leave(mod, inputs, output):
        running.pop()

    for module_name, module in model.named_modules():
        def enter(mod, inputs, name=module_name):
            running.append((name, mod))

        hooks += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
        if isinstance(module, WEIGHTED):
            weight_name = f"{module_name}.weight"

            def hook(mod, inputs, output, weight_name=weight_name):
                per_output = mod.weight[0].numel() if isinstance(mod, nn.Conv2d) else mod.in_features
                macs[weight_name] = macs.get(weight_name, 0) + output[0].numel() * per_output

            hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _WeightlessProducts(running, macs):
            device = next(model.parameters()).device
            model(torch.zeros((1, *input_shape), device=device))
    finally:
        model.train(was_training)
        for handle in hooks:
            handle.remove()
    return macs


class _WeightlessProducts(TorchDispatchMode):
    """Adds the MACs of every matrix product or convolution that runs outside a conv/linear layer to
    ``macs["<innermost running module>:weightless"]``. It watches aten ops, so it sees attention however
    it is computed (``F.scaled_dot_product_attention``'s fused kernels, or ``q @ k.transpose`` spelled
    out); torch's own FlopCounterMode misses the fused CPU kernel."""

    def __init__(self, running: list[tuple[str, nn.Module]], macs: dict[str, int]):
        super().__init__()
        self.running, self.macs = running, macs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.running and not isinstance(self.running[-1][1], WEIGHTED):
            count = _product_macs(func, args, out)
            if count:
                key = f"{self.running[-1][0] or 'model'}{WEIGHTLESS}"
                self.macs[key] = self.macs.get(key, 0) + count
        return out


def _product_macs(func, args, out) -> int:
    """MACs of one aten product op (0 for anything else)."""
    name = func.__name__.split(".")[0]
    if name in ("mm", "bmm"):
        return out.numel() * args[0].shape[-1]
    if name in ("addmm", "baddbmm"):
        return out.numel() * args[1].shape[-1]
    if name == "convolution":
        return out.numel() * args[1][0].numel()
    if "scaled_dot_product" in name and "backward" not in name:
        query, key, value = args[:3]  # [..., L, E], [..., S, E], [..., S, Ev]: scores L x S x E, values L x S x Ev
        return math.prod(query.shape[:-1]) * key.shape[-2] * (query.shape[-1] + value.shape[-1])
    return 0


def training_flops(macs: dict[str, int], mask: Tensors, frozen: Tensors, sample_passes: int) -> float:
    """FLOPs of ``sample_passes`` training samples (samples x epochs) under a mask and a frozen set."""
    per_sample = 0.0
    for name, layer_macs in macs.items():
        density, trainable = 1.0, 1.0
        if name in mask:
            active = mask[name]
            density = float(active.float().mean())
            locked = frozen.get(name)
            trainable = float((active & ~locked).float().mean()) if locked is not None else density
        per_sample += 2.0 * layer_macs * (2.0 * density + trainable)
    return per_sample * sample_passes


def forward_flops(macs: dict[str, int], mask: Tensors, sample_passes: int) -> float:
    """FLOPs of ``sample_passes`` forward passes of one sample under a mask (no backward, no weight gradient)."""
    return training_flops(macs, mask, mask, sample_passes) / 2.0


def dense_forward_macs(macs: dict[str, int]) -> int:
    return sum(macs.values())
