"""Architectures defined in this project, named ``"handler:<name>"`` in a model spec.

Only what torchvision and timm do not offer lives here: a small ReLU CNN for the
synthetic localisation set (``benchmarks/quality/train_synthetic.py`` trains it),
small enough that its weights can be committed.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional

from torch import nn

from ..engine import Registry

ARCHITECTURES: Registry = Registry("architecture", "unknown_architecture")


def register_architecture(name: str) -> Callable:
    return ARCHITECTURES.register(name)


def _conv(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> list:
    return [nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class DigitsCNN(nn.Module):
    """Five ReLU conv layers in four blocks, global average pooling, one linear layer (~80 k parameters).

    Global average pooling keeps the spatial layout up to the last block, so
    Grad-CAM and the pointing game have a map to work with; the blocks are the
    units the cascading-randomisation check re-initialises.
    """

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        w = width
        self.features = nn.Sequential(OrderedDict(
            block1=nn.Sequential(*_conv(3, w // 2, 5, stride=2)),  # 1/2
            block2=nn.Sequential(*_conv(w // 2, w), nn.MaxPool2d(2)),  # 1/4
            block3=nn.Sequential(*_conv(w, 2 * w), nn.MaxPool2d(2)),  # 1/8
            block4=nn.Sequential(*_conv(2 * w, 2 * w), *_conv(2 * w, 2 * w)),
        ))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(2 * w, num_classes)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


@register_architecture("digits_cnn")
def digits_cnn(num_classes: Optional[int] = None) -> nn.Module:
    return DigitsCNN(num_classes=num_classes or 10)
