"""``Explainer``: what it says about the predicted class and about inputs the model cannot take."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from handler.engine import Explainer
from handler.engine.explainer import EngineFailure


class NearTie(nn.Module):
    """Logits 0 and 5e-8: equal once soft-maxed in float32 (exp(5e-8) rounds to 1), distinct in float64."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4, 2)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.copy_(torch.tensor([0.0, 5e-8]))

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_the_most_probable_class_is_the_class_the_predicted_target_explains():
    explainer = Explainer(NearTie().eval().requires_grad_(False))
    x = torch.randn(1, 3, 16, 16)
    [explained] = explainer.explain(x, method="gradient")
    assert explained.target == 1
    assert int(np.argmax(explained.probabilities)) == 1 and explained.probabilities[1] > explained.probabilities[0]
    assert int(explainer.predict(x).argmax(dim=1)) == 1


def test_an_input_the_model_refuses_is_named_not_blamed_on_an_earlier_passs_activation():
    torch.manual_seed(0)
    explainer = Explainer(NearTie().eval().requires_grad_(False))
    explainer.explain(torch.randn(1, 3, 16, 16))  # an earlier pass went through every activation site
    for x, described in ((torch.randn(1, 1, 16, 16), "shape [1, 1, 16, 16] and dtype float32"),
                         (torch.randn(1, 3, 16, 16, dtype=torch.float64), "shape [1, 3, 16, 16] and dtype float64")):
        with pytest.raises(EngineFailure) as info:
            explainer.explain(x)
        message = str(info.value)
        assert f"before its first activation call, on the input of {described}" in message, message
        assert "after activation site" not in message


def test_a_nan_or_integer_input_is_refused_as_such_not_as_a_model_problem():
    explainer = Explainer(NearTie().eval().requires_grad_(False))
    with pytest.raises(ValueError, match="finite floating-point values, got float32 with NaN or infinite values"):
        explainer.explain(torch.full((1, 3, 16, 16), float("nan")), method="gradient")
    with pytest.raises(ValueError, match="finite floating-point values, got uint8"):
        explainer.explain(torch.zeros((1, 3, 16, 16), dtype=torch.uint8), method="gradient")
