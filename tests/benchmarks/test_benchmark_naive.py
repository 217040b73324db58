"""The naive per-image implementation the speed benchmark compares against computes the same maps as the engine."""

import numpy as np
import torch
import torchvision
from torch import nn

from benchmarks.speed.naive import naive_pathway_gradient
from handler.engine import METHODS, explaining


def test_naive_per_image_implementation_gives_the_engines_maps():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None)  # one in-place ReLU module called twice per block
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    model.eval()
    x = torch.randn(3, 3, 64, 64)
    targets = torch.tensor([-1, 7, -1])
    with explaining(model):
        engine = METHODS.get("pathway_gradient")(model, x, targets, sparsity=[0.7] * 3)
        naive = naive_pathway_gradient(model, x, targets.tolist(), 0.7)
    for b in range(3):
        r = np.corrcoef(engine.maps[b].flatten().numpy(), naive[b].flatten().numpy())[0, 1]
        assert r > 0.99, (b, r)
    torch.testing.assert_close(naive, engine.maps, rtol=1e-4, atol=1e-6)
