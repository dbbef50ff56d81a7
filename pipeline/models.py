"""Architecture registry: ``build_model(name, info)``. Inputs are in [0, 1]; normalisation is the first layer.

Every Conv2d / Linear is a masked layer (:mod:`pipeline.masking`), dense until a pruning method sets its mode.
CNN-small and CNN-large follow HYDRA's ``models/basic.py`` (themselves from Wong et al.'s convex-adversarial
and the CROWN-IBP papers); VGG-16-bn, WRN-28-4 and ResNet-18 follow the paper's CIFAR architectures. The first
Linear layer's width is derived from the dataset's input size, so each model runs at any dataset's size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from pipeline.data import DatasetInfo
from pipeline.registry import Registry
from pipeline.graph import Normalize
from pipeline.masking import MaskedConv2d, MaskedLinear, weight_parameters

Builder = Callable[[DatasetInfo], nn.Module]
MODELS: Registry[Builder] = Registry("architecture", "model.arch")


def model_names() -> list[str]:
    return MODELS.names()


def build_model(name: str, info: DatasetInfo) -> nn.Module:
    return MODELS.get(name)(info)


def _flat_dim(features: nn.Module, info: DatasetInfo) -> int:
    with torch.no_grad():
        return int(features.eval()(torch.zeros(1, info.channels, info.size, info.size)).flatten(1).shape[1])


def _with_head(info: DatasetInfo, features: list[nn.Module], hidden: Sequence[int]) -> nn.Sequential:
    body = nn.Sequential(Normalize(info.mean, info.std), *features, nn.Flatten())
    width = _flat_dim(body, info)
    head: list[nn.Module] = []
    for h in hidden:
        head += [MaskedLinear(width, h), nn.ReLU()]
        width = h
    head.append(MaskedLinear(width, info.classes))
    return nn.Sequential(*body, *head)


@MODELS.register()
def cnn_small(info: DatasetInfo) -> nn.Module:
    """HYDRA's CNN-small: conv(16,4,s2)-conv(32,4,s2)-fc(100)-fc(classes)."""
    return _with_head(info, [MaskedConv2d(info.channels, 16, 4, stride=2, padding=1), nn.ReLU(),
                             MaskedConv2d(16, 32, 4, stride=2, padding=1), nn.ReLU()], [100])


@MODELS.register()
def cnn_large(info: DatasetInfo) -> nn.Module:
    """HYDRA's CNN-large: conv(32,3)-conv(32,4,s2)-conv(64,3)-conv(64,4,s2)-fc(512)-fc(512)-fc(classes)."""
    return _with_head(info, [MaskedConv2d(info.channels, 32, 3, padding=1), nn.ReLU(),
                             MaskedConv2d(32, 32, 4, stride=2, padding=1), nn.ReLU(),
                             MaskedConv2d(32, 64, 3, padding=1), nn.ReLU(),
                             MaskedConv2d(64, 64, 4, stride=2, padding=1), nn.ReLU()], [512, 512])


_VGG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


@MODELS.register()
def vgg16_bn(info: DatasetInfo) -> nn.Module:
    """VGG-16 with BatchNorm, CIFAR variant (paper's VGG16-bn). Pools that would shrink below 1x1 are skipped."""
    layers: list[nn.Module] = []
    c, size = info.channels, info.size
    for v in _VGG16:
        if v == "M":
            if size >= 2:
                layers.append(nn.MaxPool2d(2))
                size //= 2
        else:
            layers += [MaskedConv2d(c, int(v), 3, padding=1, bias=False), nn.BatchNorm2d(int(v)), nn.ReLU()]
            c = int(v)
    return _with_head(info, layers, [256, 256])


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    """A residual block's skip path: the identity, or a strided 1x1 projection when the shape changes."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(MaskedConv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Pre-activation-free residual block (He et al., 2016) with masked convolutions."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.conv1 = MaskedConv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = MaskedConv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class Bottleneck(nn.Module):
    """ResNet-50's block (He et al., 2016): 1x1 reduce, 3x3 (stride here, as torchvision's v1.5), 1x1 expand x4."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = MaskedConv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = MaskedConv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = MaskedConv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


def _resnet(info: DatasetInfo, widths: Sequence[int], blocks: Sequence[int], stem: int,
            block: type[nn.Module] = BasicBlock) -> nn.Module:
    layers: list[nn.Module] = [Normalize(info.mean, info.std)]
    if info.size >= 64:  # ImageNet-style stem
        layers += [MaskedConv2d(info.channels, stem, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(stem),
                   nn.ReLU(), nn.MaxPool2d(3, stride=2, padding=1)]
    else:  # CIFAR-style stem
        layers += [MaskedConv2d(info.channels, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem), nn.ReLU()]
    c = stem
    for i, (w, n) in enumerate(zip(widths, blocks)):
        for j in range(n):
            layers.append(block(c, w, stride=2 if (j == 0 and i > 0) else 1))
            c = w * getattr(block, "expansion", 1)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), MaskedLinear(c, info.classes)]
    return nn.Sequential(*layers)


@MODELS.register()
def resnet18(info: DatasetInfo) -> nn.Module:
    return _resnet(info, [64, 128, 256, 512], [2, 2, 2, 2], stem=64)


@MODELS.register()
def resnet50(info: DatasetInfo) -> nn.Module:
    """ResNet-50 with bottleneck blocks (the paper's ImageNet network); the ImageNet stem from 64 px up."""
    return _resnet(info, [64, 128, 256, 512], [3, 4, 6, 3], stem=64, block=Bottleneck)


@MODELS.register()
def wrn_28_4(info: DatasetInfo) -> nn.Module:
    """Wide ResNet 28-4 (Zagoruyko & Komodakis) with basic blocks: 3 groups of 4 blocks, widths 64/128/256."""
    return _resnet(info, [16 * 4, 32 * 4, 64 * 4], [4, 4, 4], stem=16)


def count_parameters(model: nn.Module) -> int:
    """Weights and biases (scores and masks excluded)."""
    return sum(p.numel() for _, p in weight_parameters(model))
