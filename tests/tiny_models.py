"""Random-weight models shared by the tests: the small CNNs that pin the engine's arithmetic, and ResNet-18."""

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


class TwoReluCNN(nn.Module):
    """Two convolutions through one in-place ReLU module, mean-pooled into 5 classes."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


class MixedActivationCNN(nn.Module):
    """Conv stack with an in-place ReLU module called twice, a functional relu and a ReLU6."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.relu6 = nn.ReLU6()
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x)) + x
        x = self.relu6(torch.nn.functional.relu(self.conv3(x)) * 3)
        return self.fc(x.mean(dim=(2, 3)))


class ResidualPoolCNN(nn.Module):
    """Conv-ReLU-pool stack with an in-place ReLU module called twice, a residual and a functional relu."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x)) + x
        x = self.pool(torch.nn.functional.relu(self.conv3(x)))
        return self.fc(x.flatten(1))


class FlattenHeadCNN(nn.Module):
    """Two convolutions through one in-place ReLU module and a flattening head; seeds itself."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(16 * 8 * 8, 10)

    def forward(self, x):
        x = self.relu(self.conv1(x))
        x = self.relu(self.conv2(x))
        return self.fc(x.flatten(1))


class BatchSizeSpy(nn.Module):
    """Wraps a model and records the batch size of every forward (``batch_sizes``): how a method chunks its passes."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.batch_sizes: list = []

    def forward(self, x):
        self.batch_sizes.append(x.shape[0])
        return self.inner(x)
