"""The baseline methods agree with Captum's implementations (a test-only dependency) to float32 tolerance.

On torchvision ResNet-18 (random Kaiming weights, 64×64) and on the real
EfficientNet-Lite0 (ImageNet weights, two photos at 224×224). Agreement is
measured as ``max |ours - Captum| / max |Captum|`` per batch.

Two differences are deliberate and pinned down here rather than hidden:

- ``riemann_trapezoid``: Captum's weights sum to ``1 - 1/n``, so its
  attributions are ours times ``(n-1)/n`` (ours are complete, see
  ``test_baselines.py``);
- guided backprop on ReLU6: Captum's ``GuidedBackprop`` only rectifies
  ``nn.ReLU`` modules, so on EfficientNet-Lite0 (ReLU6 everywhere) it returns
  the plain gradient. Ours applies Captum's own rule, ``relu(grad_input)`` of the
  activation, to every ReLU-family site; compared against Captum on a copy of
  the model whose ``nn.ReLU6`` modules are an ``nn.ReLU`` subclass computing
  ``relu6`` (same function, now visible to Captum), the two agree.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

captum_attr = pytest.importorskip("captum.attr")

from handler.engine import METHODS, InputNormalisation  # noqa: E402
from handler.engine.baselines import gaussian_blur  # noqa: E402
from tiny_models import kaiming_resnet18

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

TOLERANCE = 1e-5  # relative to the largest |value| of Captum's map; measured agreement is 0 to 3e-7


def relative_difference(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    assert ours.shape == theirs.shape
    return ((ours - theirs).abs().max() / theirs.abs().max()).item()


def assert_agrees(ours: torch.Tensor, theirs: torch.Tensor, tolerance: float = TOLERANCE) -> None:
    assert theirs.abs().max() > 0, "a vacuous comparison: Captum's map is all zero"
    difference = relative_difference(ours, theirs)
    assert difference <= tolerance, difference


class CaptumVisibleReLU6(nn.ReLU):
    """``relu6``, as an ``nn.ReLU`` subclass so that Captum's guided backprop rectifies it too."""

    def forward(self, x):
        return F.relu6(x)


def relu6_visible_to_captum(model: nn.Module) -> nn.Module:
    twin = copy.deepcopy(model)
    replaced = 0
    for module in twin.modules():
        for name, child in module.named_children():
            if type(child) is nn.ReLU6:
                setattr(module, name, CaptumVisibleReLU6())
                replaced += 1
    assert replaced > 0
    return twin


# -- ResNet-18 -------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet():
    model = kaiming_resnet18()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    targets = METHODS.get("gradient")(model, x, torch.tensor([-1, 5])).targets  # predicted class, and class 5
    return model, x, targets


def test_resnet_gradient_and_input_x_gradient(resnet):
    model, x, targets = resnet
    assert_agrees(METHODS.get("gradient")(model, x, targets).maps,
                  captum_attr.Saliency(model).attribute(x.clone(), target=targets, abs=False))
    assert_agrees(METHODS.get("input_x_gradient")(model, x, targets).maps,
                  captum_attr.InputXGradient(model).attribute(x.clone(), target=targets))


@pytest.mark.parametrize("rule, baseline", [
    ("gausslegendre", "black"), ("riemann_left", "black"), ("riemann_middle", "black"), ("riemann_right", "black"),
    ("riemann_trapezoid", "black"), ("gausslegendre", "zero"), ("riemann_trapezoid", "blur"),
])
def test_resnet_integrated_gradients(resnet, rule, baseline):
    model, x, targets = resnet
    steps = 6
    norm = InputNormalisation()
    reference = {"zero": torch.zeros_like(x), "black": norm.black(x), "blur": gaussian_blur(x, 5.0)}[baseline]
    ours = METHODS.get("integrated_gradients")(model, x, targets, steps=steps, integration=rule, baseline=baseline,
                                               chunk_size=5, normalisation=norm).maps
    theirs = captum_attr.IntegratedGradients(model).attribute(
        x.clone(), baselines=reference, target=targets, n_steps=steps, method=rule, internal_batch_size=5)
    if rule == "riemann_trapezoid":
        ours = ours * (steps - 1) / steps  # Captum's trapezoid weights sum to 1 - 1/n
    assert_agrees(ours, theirs)


@pytest.mark.parametrize("layer", ["auto", "layer3", "layer2.1"])
def test_resnet_grad_cam(resnet, layer):
    model, x, targets = resnet
    module = model.get_submodule("layer4" if layer == "auto" else layer)
    cam = captum_attr.LayerGradCam(model, module).attribute(x.clone(), target=targets, relu_attributions=True)
    theirs = captum_attr.LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), "bilinear")
    assert_agrees(METHODS.get("grad_cam")(model, x, targets, layer=layer).maps, theirs)


def test_resnet_guided_backprop(resnet):
    model, x, targets = resnet
    ours = METHODS.get("guided_backprop")(model, x, targets).maps
    assert_agrees(ours, captum_attr.GuidedBackprop(model).attribute(x.clone(), target=targets))
    assert relative_difference(ours, METHODS.get("gradient")(model, x, targets).maps) > 0.1


# -- EfficientNet-Lite0 (real weights, real photos) --------------------------------


@pytest.fixture(scope="module")
def lite0(lite0_service, photos):
    model = lite0_service.explainer.model
    images = [lite0_service.decode(photos[name].read_bytes()) for name in ("coffee", "chelsea")]
    x = lite0_service.preprocessor.batch(images)
    targets = METHODS.get("gradient")(model, x, torch.tensor([-1, -1])).targets
    assert targets[0].item() == 967  # espresso: the real weights are loaded
    return model, x, targets, lite0_service.explainer.normalisation


def test_lite0_gradient_and_input_x_gradient(lite0):
    model, x, targets, _ = lite0
    assert_agrees(METHODS.get("gradient")(model, x, targets).maps,
                  captum_attr.Saliency(model).attribute(x.clone(), target=targets, abs=False))
    assert_agrees(METHODS.get("input_x_gradient")(model, x, targets).maps,
                  captum_attr.InputXGradient(model).attribute(x.clone(), target=targets))


@pytest.mark.parametrize("rule, baseline", [("gausslegendre", "black"), ("riemann_trapezoid", "blur")])
def test_lite0_integrated_gradients(lite0, rule, baseline):
    model, x, targets, norm = lite0
    x, targets = x[:1], targets[:1]  # one photo: each step is a full 224×224 forward and backward
    steps = 4
    assert norm == InputNormalisation((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # from the model spec: black is -1
    reference = {"black": torch.full_like(x, -1.0), "blur": gaussian_blur(x, 5.0)}[baseline]
    ours = METHODS.get("integrated_gradients")(model, x, targets, steps=steps, integration=rule,
                                               baseline=baseline, normalisation=norm).maps
    theirs = captum_attr.IntegratedGradients(model).attribute(
        x.clone(), baselines=reference, target=targets, n_steps=steps, method=rule)
    if rule == "riemann_trapezoid":
        ours = ours * (steps - 1) / steps
    assert_agrees(ours, theirs)


def test_lite0_grad_cam_defaults_to_the_head_activation(lite0):
    model, x, targets, _ = lite0
    cam = captum_attr.LayerGradCam(model, model.bn2.act).attribute(x.clone(), target=targets, relu_attributions=True)
    theirs = captum_attr.LayerAttribution.interpolate(cam, tuple(x.shape[-2:]), "bilinear")
    assert_agrees(METHODS.get("grad_cam")(model, x, targets).maps, theirs)
    assert_agrees(METHODS.get("grad_cam")(model, x, targets, layer="bn2").maps, theirs)


def test_lite0_guided_backprop_rectifies_relu6_as_captum_would(lite0):
    model, x, targets, _ = lite0
    ours = METHODS.get("guided_backprop")(model, x, targets).maps
    plain = METHODS.get("gradient")(model, x, targets).maps
    # Captum as shipped does not see ReLU6: its "guided backprop" of this network is the plain gradient.
    captum_as_shipped = captum_attr.GuidedBackprop(model).attribute(x.clone(), target=targets)
    assert_agrees(captum_as_shipped, plain)
    assert relative_difference(ours, plain) > 0.1
    # Captum's rule applied to the ReLU6 modules (same function) is ours.
    twin = relu6_visible_to_captum(model)
    assert torch.equal(twin(x), model(x))
    assert_agrees(ours, captum_attr.GuidedBackprop(twin).attribute(x.clone(), target=targets))
