"""SparsyFed's parts: Powerprop layers with activation pruning, global top-k masks, FedAvg over the union."""

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import play, simulation
from hypothesis import given, settings
from hypothesis import strategies as st

from fl_sparse.core.interfaces import ClientResult
from fl_sparse.models import LeNet
from fl_sparse.models.powerprop import Powerprop, effective_weight, keep_largest
from fl_sparse.parts.aggregators import UnionAverage
from fl_sparse.parts.executors.vectorized import needs_sequential
from fl_sparse.sparse.mask_ops import prune_globally_to


def test_effective_weight_has_zero_finite_gradient_at_zero():
    v = torch.tensor([-2.0, -0.5, 0.0, 0.5, 2.0], requires_grad=True)
    w = effective_weight(v, 1.25)
    assert torch.allclose(w, torch.sign(v) * v.abs() ** 1.25)
    w.sum().backward()
    assert torch.isfinite(v.grad).all() and v.grad[2] == 0
    assert torch.allclose(v.grad, 1.25 * v.detach().abs() ** 0.25)


@pytest.mark.kernels
def test_powerprop_keeps_names_and_starts_from_the_base_models_effective_weights():
    torch.manual_seed(0)
    base = LeNet(10)
    torch.manual_seed(0)
    model = Powerprop(beta=1.25)(LeNet(10))
    assert list(model.state_dict()) == list(base.state_dict())
    for (name, v), w0 in zip(model.named_parameters(), base.parameters()):
        got = effective_weight(v, 1.25) if name.endswith("weight") else v
        assert torch.allclose(got, w0, rtol=1e-5, atol=1e-7), name
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(model(x), base(x), atol=1e-5)


def _layers(kind):
    torch.manual_seed(1)
    if kind == "conv":
        layer, x = torch.nn.Conv2d(6, 4, 3, padding=1), torch.randn(5, 6, 8, 8).relu()
    else:
        layer, x = torch.nn.Linear(12, 7), torch.randn(5, 12).relu()
    with torch.no_grad():  # a 60 % sparse weight, so 40 % of the input is kept for the weight gradient
        layer.weight.mul_(torch.rand_like(layer.weight) < 0.4)
    plain = type(layer)(*((6, 4, 3) if kind == "conv" else (12, 7)), **({"padding": 1} if kind == "conv" else {}))
    plain.load_state_dict(layer.state_dict())
    return Powerprop(beta=1.0, prune_activations=True)(layer), plain, x


@pytest.mark.kernels
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_activation_pruning_changes_only_the_weight_gradient(kind):
    pruned_layer, plain, x = _layers(kind)
    density = int(torch.count_nonzero(plain.weight)) / plain.weight.numel()
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out = pruned_layer(x1)
    want = plain(x2)
    assert torch.equal(out, want)  # the forward pass is exact: the same F.conv2d / F.linear call on the same input
    upstream = torch.randn_like(out)
    out.backward(upstream)
    want.backward(upstream)
    # Backward: our hand-written one against autograd's, not necessarily the same kernel calls: a tolerance
    assert torch.allclose(x1.grad, x2.grad, atol=1e-6)  # the input gradient is unchanged
    assert torch.allclose(pruned_layer.bias.grad, plain.bias.grad, atol=1e-6)
    # the weight gradient is the one of the same layer fed the pruned input
    reference = plain.weight.detach().clone().requires_grad_()
    kept = keep_largest(x, density)
    (F.conv2d(kept, reference, padding=1) if kind == "conv" else F.linear(kept, reference)).backward(upstream)
    assert torch.allclose(pruned_layer.weight.grad, reference.grad, atol=1e-6)
    assert not torch.allclose(pruned_layer.weight.grad, plain.weight.grad, atol=1e-6)
    assert int(torch.count_nonzero(kept)) == math.ceil(density * x.numel())


@pytest.mark.kernels
def test_evaluation_and_no_grad_never_prune():
    pruned_layer, plain, x = _layers("linear")
    pruned_layer.eval()
    with torch.no_grad():
        assert torch.equal(pruned_layer(x), plain(x))


def test_vectorized_runs_activation_pruning_sequentially():
    assert needs_sequential(Powerprop(prune_activations=True)(LeNet(10)))
    assert not needs_sequential(Powerprop(prune_activations=False)(LeNet(10)))


def _train(model, steps=40):
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 32, 32, generator=generator), torch.randint(0, 10, (64,), generator=generator)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _sparse_powerprop_lenet(prune_activations):
    torch.manual_seed(0)
    model = Powerprop(prune_activations=prune_activations)(LeNet(10))
    with torch.no_grad():  # 70 % sparse beyond the first layer, so activation pruning is active
        for name, p in model.named_parameters():
            if name.endswith("weight") and name != "conv1.weight":
                p.mul_(torch.rand_like(p) < 0.3)
    return model


def test_powerprop_lenet_learns():
    torch.manual_seed(0)
    losses = _train(Powerprop()(LeNet(10)))
    assert losses[-1] < 0.75 * losses[0]


def test_sparse_powerprop_training_keeps_zeros_and_activation_pruning_acts():
    model = _sparse_powerprop_lenet(prune_activations=True)
    zeros = {name: p == 0 for name, p in model.named_parameters() if name.endswith("weight")}
    with_pruning = _train(model, steps=10)
    for name, p in model.named_parameters():  # Powerprop gives a weight at 0 no gradient
        if name in zeros:
            assert torch.all(p[zeros[name]] == 0), name
    without = _train(_sparse_powerprop_lenet(prune_activations=False), steps=10)
    assert with_pruning[0] == without[0] and with_pruning[-1] != without[-1]


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4), density=st.floats(0.0, 1.0),
       frozen_share=st.floats(0.0, 0.5), seed=st.integers(0, 2**16))
def test_global_prune_keeps_exactly_the_largest_magnitudes(sizes, density, frozen_share, seed):
    generator = torch.Generator().manual_seed(seed)
    names = [f"t{i}" for i in range(len(sizes))]
    weights = {n: torch.randn(size, generator=generator).round(decimals=1) for n, size in zip(names, sizes)}
    mask = {n: torch.rand(size, generator=generator) < 0.8 for n, size in zip(names, sizes)}
    frozen = {n: mask[n] & (torch.rand(size, generator=generator) < frozen_share) for n, size in zip(names, sizes)}
    weights = {n: torch.where(mask[n], w, torch.zeros_like(w)) for n, w in weights.items()}
    active = sum(int(m.sum()) for m in mask.values())
    locked = sum(int(f.sum()) for f in frozen.values())
    count = round(density * active)
    new_weights, new_mask = prune_globally_to(weights, mask, names, count, frozen)
    kept = sum(int(m.sum()) for m in new_mask.values())
    assert kept == max(count, locked) if count < active else kept == active
    for n in names:
        assert torch.all(new_mask[n] <= mask[n]) and torch.all(new_mask[n] >= frozen[n])
        assert torch.equal(new_weights[n][new_mask[n]], weights[n][new_mask[n]])
        assert torch.all(new_weights[n][~new_mask[n]] == 0)
    free_kept = torch.cat([weights[n][new_mask[n] & ~frozen[n]].abs() for n in names])
    dropped = torch.cat([weights[n][mask[n] & ~new_mask[n]].abs() for n in names])
    if len(free_kept) and len(dropped):
        assert free_kept.min() >= dropped.max()  # one threshold across all tensors


def test_union_average_with_absent_as_zero_is_plain_fedavg():
    weights = {"w": torch.zeros(3)}
    clients = [ClientResult(0, {"w": torch.tensor([4.0, 2.0, 0.0])}, {"w": torch.tensor([True, True, False])}, 1, 0.0),
               ClientResult(1, {"w": torch.tensor([0.0, 6.0, 0.0])}, {"w": torch.tensor([False, True, False])}, 3, 0.0)]
    dense = {"w": torch.ones(3, dtype=torch.bool)}
    mean, union = UnionAverage(absent_as_zero=True).aggregate(weights, dense, {}, clients)
    assert torch.allclose(mean["w"], torch.tensor([1.0, 5.0, 0.0]))  # (4*1 + 0*3)/4, (2*1 + 6*3)/4
    assert union["w"].tolist() == [True, True, False]
    holders_only, _ = UnionAverage().aggregate(weights, dense, {}, clients)
    assert torch.allclose(holders_only["w"], torch.tensor([4.0, 5.0, 0.0]))


def test_the_exact_density_variant_keeps_the_first_layer_dense_and_the_rest_at_the_target():
    sim = simulation("sparsyfed_exact_density", rounds=3)
    policy = sim.experiment.mask_policy
    assert policy.pruned_names == ["conv2.weight", "fc1.weight", "fc2.weight", "fc3.weight"]
    start = sim.initial_state()
    assert all(bool(m.all()) for m in start.mask.values())  # SparsyFed starts dense
    for _, state, metrics in play(sim):
        assert bool(state.mask["conv1.weight"].all())
        assert sum(int(state.mask[n].sum()) for n in policy.pruned_names) == policy.count(0.8)
        for n, m in state.mask.items():
            assert torch.all(state.weights[n][~m] == 0)
        assert metrics["uplink_bytes_per_client"] < 0.4 * 4 * sum(w.numel() for w in state.weights.values())


def test_activation_pruning_refuses_non_zero_padding_when_built():
    from fl_sparse.core.errors import ConfigError

    reflect = torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ConfigError, match="padding_mode='zeros' only"):
        Powerprop()(reflect)
    Powerprop(prune_activations=False)(torch.nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
