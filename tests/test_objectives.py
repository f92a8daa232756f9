import pytest
import torch
from torch.func import grad

from fl_sparse.parts.objectives import SGD, CrossEntropy, Proximal


def _grads(objective, params, global_params, x, y):
    def loss(p):
        logits = x @ p["w"] + p["b"]
        return objective.loss(logits, y, p, global_params)
    return grad(loss)(params)


@pytest.mark.kernels
def test_fedprox_term_changes_the_gradient_by_exactly_mu_times_the_drift():
    torch.manual_seed(0)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    params = {"w": torch.randn(5, 3, dtype=torch.float64), "b": torch.randn(3, dtype=torch.float64)}
    global_params = {k: v + torch.randn_like(v) for k, v in params.items()}
    mu = 0.37
    plain = _grads(CrossEntropy(), params, global_params, x, y)
    prox = _grads(Proximal(mu), params, global_params, x, y)
    for name in params:
        expected = mu * (params[name] - global_params[name])
        torch.testing.assert_close(prox[name] - plain[name], expected, rtol=1e-12, atol=1e-12)
        assert (prox[name] - plain[name]).abs().max() > 0.01  # not a no-op, unlike the reference


@pytest.mark.kernels
def test_sgd_matches_torch_sgd_when_everything_is_trainable():
    torch.manual_seed(1)
    p = torch.randn(20)
    reference = torch.nn.Parameter(p.clone())
    torch_sgd = torch.optim.SGD([reference], lr=0.1, momentum=0.9, weight_decay=1e-3)
    ours = SGD(lr=0.1, momentum=0.9, weight_decay=1e-3)
    params, state = {"p": p.clone()}, ours.init({"p": p})
    for _ in range(5):
        g = torch.randn(20)
        reference.grad = g.clone()
        torch_sgd.step()
        params, state = ours.step(params, {"p": g}, state, {})
    torch.testing.assert_close(params["p"], reference.detach(), rtol=0, atol=1e-6)


def test_sgd_never_moves_untrainable_coordinates():
    torch.manual_seed(2)
    p = torch.randn(100)
    p[::3] = 0.0
    trainable = torch.rand(100) > 0.5
    opt = SGD(lr=0.5, momentum=0.9, weight_decay=0.1)
    params, state = {"p": p.clone()}, opt.init({"p": p})
    for _ in range(10):
        params, state = opt.step(params, {"p": torch.randn(100) * 10}, state, {"p": trainable})
    assert torch.equal(params["p"][~trainable], p[~trainable])
    assert torch.equal(state["p"][~trainable], torch.zeros(int((~trainable).sum())))
    assert not torch.equal(params["p"][trainable], p[trainable])


def test_reference_softmax_is_cross_entropy_of_probabilities_and_shrinks_the_gradient():
    torch.manual_seed(1)
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randint(0, 3, (16,))
    params = {"w": 3 * torch.randn(5, 3, dtype=torch.float64), "b": torch.zeros(3, dtype=torch.float64)}
    logits = x @ params["w"]
    expected = torch.nn.CrossEntropyLoss()(torch.softmax(logits, 1), y)  # what the reference computes
    for objective in (CrossEntropy(reference_softmax=True), Proximal(0.0, reference_softmax=True)):
        assert torch.equal(objective.loss(logits, y, params, params), expected)
    plain = _grads(CrossEntropy(), params, params, x, y)["w"].norm()
    squashed = _grads(CrossEntropy(reference_softmax=True), params, params, x, y)["w"].norm()
    assert squashed < 0.5 * plain


@pytest.mark.parametrize("momentum, weight_decay, gate_dtype", [
    (0.9, 1e-3, torch.float32), (0.9, 0.0, torch.bool), (0.0, 1e-3, torch.float32), (0.0, 0.0, None)])
def test_sgd_step_in_place_gives_steps_numbers_bitwise(momentum, weight_decay, gate_dtype):
    """Same kernels on the same tensors, only written in place: the sequential path (step_in_place) and the
    vectorized one (step) must keep computing the same updates."""
    torch.manual_seed(3)
    shapes = {"conv": (6, 3, 5, 5), "fc": (120, 400), "bias": (120,)}
    params = {name: torch.randn(shape) for name, shape in shapes.items()}
    gates = {} if gate_dtype is None else {"conv": (torch.rand(6, 3, 5, 5) > 0.5).to(gate_dtype),
                                           "fc": (torch.rand(120, 400) > 0.8).to(gate_dtype)}
    opt = SGD(lr=0.05, momentum=momentum, weight_decay=weight_decay)
    functional, functional_state = dict(params), opt.init(params)
    in_place, in_place_state = {name: p.clone() for name, p in params.items()}, opt.init(params)
    for _ in range(4):
        grads = {name: torch.randn_like(p) * 3 for name, p in params.items()}
        functional, functional_state = opt.step(functional, grads, functional_state, gates)
        in_place, in_place_state = opt.step_in_place(in_place, {n: g.clone() for n, g in grads.items()},
                                                     in_place_state, gates)
    for name in params:
        assert torch.equal(in_place[name], functional[name]), name
        assert not torch.equal(in_place[name], params[name]), name  # it trained
        if momentum:
            assert torch.equal(in_place_state[name], functional_state[name]), name
