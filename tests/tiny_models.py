"""Random-weight models shared by the tests."""

import torch
import torchvision
from torch import nn


def kaiming(model: nn.Module, seed: int = 0) -> nn.Module:
    """Kaiming weights keep activations alive through deep stacks (torchvision's random defaults can vanish)."""
    torch.manual_seed(seed)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model.eval()


def kaiming_resnet18(seed: int = 0) -> nn.Module:
    """torchvision's ResNet-18 (reused in-place ReLU modules) with Kaiming weights, frozen, in eval mode."""
    torch.manual_seed(seed)
    return kaiming(torchvision.models.resnet18(weights=None), seed).requires_grad_(False)
