"""Properties of freezing: the trainable set (mask_ops.trainable), the functional SGD (objectives.SGD) that
must leave frozen and masked-out coordinates bitwise alone, and FreezeAtStage's frozen set."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from codec_helpers import bits
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fl_sparse.core.interfaces import Phase, RoundContext
from fl_sparse.parts.freezing import FreezeAtStage
from fl_sparse.parts.objectives import SGD
from fl_sparse.sparse import mask_ops

pytestmark = pytest.mark.property

small_shape = hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=4)
finite = st.floats(-1e3, 1e3, width=32).filter(lambda x: x == 0.0 or abs(x) > 1e-30)  # no subnormal noise


@st.composite
def frozen_state(draw, max_tensors: int = 3):
    """weights (masked, +0.0 outside), mask, frozen subset of the mask (absent for some names), and a few
    unmasked tensors (biases) that are always trainable."""
    weights, mask, frozen = {}, {}, {}
    for i in range(draw(st.integers(1, max_tensors))):
        shape = draw(small_shape)
        name = f"layer{i}.weight"
        mask[name] = torch.from_numpy(draw(hnp.arrays(np.bool_, shape)))
        w = torch.from_numpy(draw(hnp.arrays(np.float32, shape, elements=finite)))
        weights[name] = torch.where(mask[name], w, torch.zeros_like(w))
        if draw(st.booleans()):
            frozen[name] = mask[name] & torch.from_numpy(draw(hnp.arrays(np.bool_, shape)))
        if draw(st.booleans()):
            weights[f"layer{i}.bias"] = torch.from_numpy(draw(hnp.arrays(np.float32, (shape[0],), elements=finite)))
    return weights, mask, frozen


@given(state=frozen_state())
def test_trainable_is_the_mask_minus_the_frozen_set(state):
    _, mask, frozen = state
    train = mask_ops.trainable(mask, frozen)
    assert train.keys() == mask.keys()
    for name, m in mask.items():
        f = frozen.get(name, torch.zeros_like(m))
        assert train[name].dtype == torch.bool and train[name].shape == m.shape
        assert not torch.any(train[name] & f), "frozen and trainable must be disjoint"
        assert not torch.any(train[name] & ~m), "trainable lies inside the mask"
        assert torch.equal(train[name] | f, m), "every masked coordinate is frozen or trainable"


@pytest.mark.kernels  # against torch.optim.SGD's own (foreach) kernels, with a tolerance
@given(state=frozen_state(), steps=st.integers(1, 5), seed=st.integers(0, 2**32 - 1),
       lr=st.sampled_from([1e-3, 0.01, 0.5]), momentum=st.sampled_from([0.0, 0.5, 0.9]),
       weight_decay=st.sampled_from([0.0, 1e-3, 0.1]), grad_scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_sgd_leaves_frozen_and_masked_out_coordinates_bitwise_alone(state, steps, seed, lr, momentum,
                                                                     weight_decay, grad_scale):
    """Random (dense) gradients, any number of steps: frozen values never move, masked-out ones stay +0.0,
    their momentum stays untouched, and trainable coordinates follow torch.optim.SGD."""
    weights, mask, frozen = state
    g = torch.Generator().manual_seed(seed)
    optimizer = SGD(lr=lr, momentum=momentum, weight_decay=weight_decay)
    train = mask_ops.trainable(mask, frozen)
    params, opt_state = dict(weights), optimizer.init(weights)
    reference = {name: torch.nn.Parameter(w.clone()) for name, w in weights.items()}
    torch_sgd = torch.optim.SGD(list(reference.values()), lr=lr, momentum=momentum, weight_decay=weight_decay)
    for _ in range(steps):
        grads = {name: torch.randn(p.shape, generator=g) * grad_scale for name, p in params.items()}
        params, opt_state = optimizer.step(params, grads, opt_state, train)
        for name, p in reference.items():
            p.grad = grads[name].clone()
        torch_sgd.step()
    for name, w in weights.items():
        p = params[name]
        assert p.dtype == w.dtype and p.shape == w.shape
        if name not in mask:  # unmasked tensors train everywhere
            torch.testing.assert_close(p, reference[name].detach(), rtol=1e-4, atol=1e-5)
            continue
        m, f, t = mask[name], frozen.get(name, torch.zeros_like(mask[name])), train[name]
        # Values, not bits: the update adds +-0.0 there, which may turn a frozen -0.0 into +0.0. (Frozen
        # weights are non-zero by construction, and masked-out ones are checked bitwise below.)
        assert torch.equal(p[f], w[f]), "frozen weights moved"
        assert torch.all(bits(p)[~m] == 0), "masked-out weights must stay exactly +0.0"
        if momentum:
            assert torch.all(bits(opt_state[name])[~t] == 0), "momentum of untrainable coordinates changed"
        torch.testing.assert_close(p[t], reference[name].detach()[t], rtol=1e-4, atol=1e-5)


@given(state=frozen_state(), stage_ends=st.booleans())
def test_freeze_at_stage_freezes_exactly_the_nonzero_masked_weights_when_a_stage_ends(state, stage_ends):
    weights, mask, frozen = state
    phase = Phase(round=3, stage=0, sparsity=0.5, differential=0.1, readjust=False, finalize=False,
                  stage_ends=stage_ends, progress=1.0)
    new = FreezeAtStage().server_step(RoundContext(phase, torch.Generator()), weights, mask, frozen)
    if not stage_ends:
        assert new is frozen
        return
    assert new.keys() == mask.keys()
    for name, m in mask.items():
        old = frozen.get(name, torch.zeros_like(m))
        assert torch.equal(new[name], old | (m & (weights[name] != 0)))
        assert not torch.any(new[name] & ~m), "the frozen set stays inside the mask"
        assert not torch.any(mask_ops.trainable(mask, new)[name] & new[name])
