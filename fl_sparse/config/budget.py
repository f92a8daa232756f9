"""Measuring the equal-communication budget rule's constant (:mod:`fl_sparse.parts.budget_rule`)."""

from __future__ import annotations

import torch

from fl_sparse.config.compose import compose
from fl_sparse.core.interfaces import Link, Message
from fl_sparse.core.rng import generator
from fl_sparse.sparse.mask_ops import apply_mask


def measure_feddst_bytes(presets: list[str], num_classes: int, bindings: list[str] = ()) -> tuple[int, int]:
    """(uplink, downlink) bytes per client of one FedDST round in the presets' setting: the initial state of
    ``algorithms/feddst.gin`` (its mask policy at the preset's sparsity, its codecs) encoded both ways. No data
    are loaded. Parses gin, so it replaces whatever configuration was in force."""
    # CIFAR-100 requires a data_dir before anything is built; nothing is read from it here.
    exp = compose("feddst", list(presets), ["CIFAR100.data_dir = 'unused'", *bindings]).experiment
    torch.manual_seed(0)
    model = exp.model(num_classes)
    exp.mask_policy.setup(model, exp.schedule)
    weights = {name: t.detach() for name, t in model.state_dict().items()}
    mask = exp.mask_policy.initial_mask(weights, generator(exp.seed, "mask", 0))
    message = Message(apply_mask(weights, mask), mask)
    sizes = []
    for direction, codec in (("up", exp.uplink_codec), ("down", exp.downlink_codec)):
        link = Link(direction=direction, client_id=0, frozen={}, frozen_values=message.tensors, freeze_version=0,
                    mask=mask)
        sizes.append(len(codec.encode(message, link)))
    return sizes[0], sizes[1]
