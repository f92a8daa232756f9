"""BatchAsChannelsMaxPool2d must be nn.MaxPool2d bit for bit: values, chosen maxima and gradients.

Bitwise although the two run different kernels (channels-last against contiguous pooling): a max does no
rounding, and both backward kernels add each plane's upstream gradients into an input cell in the same
(output row, output column) order, whatever the vector width. The forced-down pass (make test-kernels-down)
checks that on the lower ISA too."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_sparse.models.layers import BatchAsChannelsMaxPool2d

pytestmark = pytest.mark.kernels


def _input_with_ties(batch, channels, size, seed, channels_last):
    generator = torch.Generator().manual_seed(seed)
    # Rounded values tie often; a constant plane (a fully pruned filter's output) ties everywhere, and
    # the clamp adds the zero plateaus a ReLU leaves.
    x = (torch.randn(batch, channels, size, size, generator=generator) * 2).round().clamp(min=-1)
    x[0, 0] = 0.5
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _value_and_grad(pool, x, upstream):
    x = x.clone().requires_grad_()
    out = pool(x)
    out.backward(upstream)
    return out.detach(), x.grad


@settings(max_examples=40, deadline=None)
@given(batch=st.integers(1, 5), channels=st.integers(1, 15), size=st.integers(5, 12),
       kernel=st.integers(1, 4), stride=st.integers(1, 3), padding=st.integers(0, 1),
       ceil_mode=st.booleans(), channels_last=st.booleans(), seed=st.integers(0, 2**16))
def test_pool_is_bitwise_nn_maxpool2d(batch, channels, size, kernel, stride, padding, ceil_mode, channels_last, seed):
    padding = min(padding, kernel // 2)
    args = dict(kernel_size=kernel, stride=stride, padding=padding, ceil_mode=ceil_mode)
    x = _input_with_ties(batch, channels, size, seed, channels_last)
    reference = torch.nn.MaxPool2d(**args)
    upstream = torch.randn(reference(x).shape, generator=torch.Generator().manual_seed(seed + 1))
    want_out, want_grad = _value_and_grad(reference, x, upstream)
    got_out, got_grad = _value_and_grad(BatchAsChannelsMaxPool2d(**args), x, upstream)
    assert torch.equal(got_out, want_out)
    assert torch.equal(got_grad, want_grad)


def test_pool_under_vmap_matches_per_sample_gradients():
    """The vectorized executor runs the model under vmap over clients: each client's gradient must be
    the one nn.MaxPool2d gives that client alone."""
    x = _input_with_ties(3 * 4, 6, 10, seed=3, channels_last=True).view(3, 4, 6, 10, 10)
    weights = torch.randn(3, 6, 8, 8)

    def loss(pool, w, xi):
        return (pool(xi) * w).sum()

    fast = torch.func.vmap(torch.func.grad(lambda w, xi: loss(BatchAsChannelsMaxPool2d(3, 1), w, xi), argnums=1))
    got = fast(weights, x)
    for client in range(3):
        want = torch.func.grad(lambda xi: loss(torch.nn.MaxPool2d(3, 1), weights[client], xi))(x[client])  # noqa: B023
        assert torch.equal(got[client], want)
