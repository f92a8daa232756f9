"""Training FLOPs as in the PFFDST paper's labels (SPEC section 5).

Per sample and layer, a dense step costs ``2 * MACs`` for each of three phases: forward, backward to the
inputs, and the weight gradient. Sparse training scales the forward and input-gradient phases by the
layer's density and the weight-gradient phase by the trainable density (frozen weights skip it).
Only conv/linear MACs are counted (norms, activations and pooling are negligible).
"""

from __future__ import annotations

import torch
from torch import nn

from fl_sparse.interfaces import Tensors


def forward_macs(model: nn.Module, input_shape: tuple[int, ...] = (3, 32, 32)) -> dict[str, int]:
    """Multiply-accumulates of one forward pass of one sample, per conv/linear weight name."""
    macs: dict[str, int] = {}
    hooks = []
    for module_name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            weight_name = f"{module_name}.weight"

            def hook(mod, inputs, output, weight_name=weight_name):
                per_output = mod.weight[0].numel() if isinstance(mod, nn.Conv2d) else mod.in_features
                macs[weight_name] = macs.get(weight_name, 0) + output[0].numel() * per_output

            hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        device = next(model.parameters()).device
        model(torch.zeros((1, *input_shape), device=device))
    model.train(was_training)
    for handle in hooks:
        handle.remove()
    return macs


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


def dense_forward_macs(macs: dict[str, int]) -> int:
    return sum(macs.values())
