import pytest
import torch

from fl_sparse.core.errors import ConfigError
from fl_sparse.models import LeNet, ResNet18, maskable_names, timm_model, vit_tiny_cifar


def _count(model):
    return sum(p.numel() for p in model.parameters())


def _forward_backward(model, classes=10):
    x = torch.randn(4, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (4, classes)
    torch.nn.functional.cross_entropy(logits, torch.arange(4) % classes).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_lenet_matches_the_reference_variant():
    model = LeNet(10)
    assert _count(model) == 782_006
    assert maskable_names(model) == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight", "fc3.weight"]
    _forward_backward(model)


def test_lenet_returns_logits_not_probabilities():
    logits = LeNet(10)(torch.randn(8, 3, 32, 32))
    assert not torch.allclose(logits.sum(1), torch.ones(8))


def test_resnet18_for_cifar_has_the_expected_size():
    model = ResNet18(10)
    assert _count(model) == 11_173_962
    assert "bn1.weight" not in maskable_names(model)  # norm parameters stay dense
    _forward_backward(model)


def test_timm_vit_tiny_at_32x32():
    model = vit_tiny_cifar(10)
    _forward_backward(model)
    assert any("attn.qkv.weight" in name for name in maskable_names(model))


def test_unknown_timm_model_is_a_config_error():
    with pytest.raises(ConfigError, match="TimmModel.name"):
        timm_model(10, name="no_such_model_xyz")
