"""Models, each a gin configurable returning a fresh ``nn.Module`` for a given number of classes."""

from __future__ import annotations

import os

import gin
import torch
from torch import nn

from fl_sparse.core.errors import ConfigError
from fl_sparse.models.layers import BatchAsChannelsMaxPool2d
from fl_sparse.models.normalized import NormalizedSparseConv  # noqa: F401  (gin-registered, as is Powerprop)
from fl_sparse.models.powerprop import Powerprop  # noqa: F401  (gin-registered: Experiment.reparameterization)
from fl_sparse.models.resnet import ResNet18
from fl_sparse.models.vit import vit32  # noqa: F401  (gin-registered: ViT32)


class LeNet(nn.Module):
    """The LeNet variant of the FedDST/PFFDST reference code (782,006 parameters for 10 classes).

    Unlike the reference, it returns logits: the reference applied softmax before a cross-entropy
    loss that applies it again, which keeps training at chance level for tens of rounds.
    """

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 20 * 20, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        self.pool = BatchAsChannelsMaxPool2d(3, stride=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.pool(self.conv1(x)))
        x = torch.relu(self.pool(self.conv2(x)))
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class LeNetBN(LeNet):
    """:class:`LeNet` with a BatchNorm after each convolution (before its pooling), for the methods that need
    BatchNorm: FedTiny selects its initial mask by re-estimated BatchNorm statistics. 782,050 parameters for 10
    classes (LeNet's + 2 x (6 + 16) BatchNorm affine), and BatchNorm running statistics."""

    def __init__(self, num_classes: int = 10):
        super().__init__(num_classes)
        self.bn1, self.bn2 = nn.BatchNorm2d(6), nn.BatchNorm2d(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.pool(self.bn1(self.conv1(x))))
        x = torch.relu(self.pool(self.bn2(self.conv2(x))))
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


@gin.configurable("LeNet")
def lenet(num_classes: int) -> nn.Module:
    return LeNet(num_classes)


@gin.configurable("LeNetBN")
def lenet_bn(num_classes: int) -> nn.Module:
    return LeNetBN(num_classes)


@gin.configurable("ResNet18")
def resnet18(num_classes: int) -> nn.Module:
    return ResNet18(num_classes)


@gin.configurable("TimmModel")
def timm_model(num_classes: int, name: str = gin.REQUIRED, **kwargs) -> nn.Module:
    """Any timm architecture by name, always randomly initialised (this library never downloads
    weights). Extra keyword arguments go to ``timm.create_model``, e.g. for a ViT-Tiny on CIFAR:
    ``TimmModel.name = 'vit_tiny_patch16_224'`` with ``img_size=32, patch_size=4``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import timm

    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, **kwargs)
    except RuntimeError as error:  # timm raises RuntimeError for unknown names
        raise ConfigError(f"TimmModel.name={name!r}: {error}; see timm.list_models()") from None


@gin.configurable("vit_tiny_cifar")
def vit_tiny_cifar(num_classes: int) -> nn.Module:
    """ViT-Tiny adapted to 32x32 inputs with 4x4 patches (64 tokens)."""
    return timm_model(num_classes, name="vit_tiny_patch16_224", img_size=32, patch_size=4)


def maskable_names(module: nn.Module) -> list[str]:
    """Names of the tensors that sparse training masks: every conv/linear ``weight``.

    Biases and normalisation parameters stay dense, as in the reference code (a masked BN gamma,
    which the reference produced, silently kills channels)."""
    names = []
    for module_name, sub in module.named_modules():
        if isinstance(sub, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            names.append(f"{module_name}.weight" if module_name else "weight")
    return names
