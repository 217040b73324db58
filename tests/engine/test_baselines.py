"""The baseline attribution methods: each one's defining property, batching, options and chunking."""

import inspect
import math

import pytest
import torch
import torchvision
from torch import nn

from handler.engine import METHODS, SELECTIONS, Explainer, InputNormalisation, explaining
from handler.engine.baselines import gaussian_blur, integration_rule
from handler.errors import InvalidOption
from tiny_models import BatchSizeSpy, MixedActivationCNN, kaiming_resnet18

BASELINE_METHODS = ["input_x_gradient", "integrated_gradients", "smoothgrad", "grad_cam", "guided_backprop"]
FAST_OPTIONS = {"integrated_gradients": {"steps": 8, "chunk_size": 5}, "smoothgrad": {"samples": 4, "chunk_size": 3}}


@pytest.fixture(scope="module")
def small_cnn():
    torch.manual_seed(0)
    return MixedActivationCNN().double().eval().requires_grad_(False)


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(1)
    return torch.randn(3, 3, 16, 16, dtype=torch.float64)


def linear_model() -> nn.Module:
    """f(x) = w·x + b: every path integral is exact, so integrated gradients must be exactly complete."""
    torch.manual_seed(2)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 4)).double().eval().requires_grad_(False)


# -- input × gradient ---------------------------------------------------------


def test_input_x_gradient_is_input_times_gradient(small_cnn, inputs):
    targets = torch.tensor([-1, 2, 7])
    grad = METHODS.get("gradient")(small_cnn, inputs, targets)
    ixg = METHODS.get("input_x_gradient")(small_cnn, inputs, targets)
    assert torch.equal(ixg.maps, inputs * grad.maps)
    assert torch.equal(ixg.targets, grad.targets)


# -- integrated gradients -----------------------------------------------------


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_left", "riemann_middle", "riemann_right",
                                  "riemann_trapezoid"])
def test_integration_rules_integrate_a_constant_exactly_and_stay_in_the_unit_interval(rule):
    alphas, weights = integration_rule(rule, 7)
    assert len(alphas) == len(weights) == 7
    assert math.isclose(sum(weights), 1.0, rel_tol=1e-12)
    assert all(0.0 <= a <= 1.0 for a in alphas)


@pytest.mark.parametrize("rule", ["gausslegendre", "riemann_left", "riemann_trapezoid"])
@pytest.mark.parametrize("baseline", ["zero", "black", "blur"])
def test_integrated_gradients_is_exactly_complete_on_a_linear_model(rule, baseline):
    model = linear_model()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    norm = InputNormalisation()
    out = METHODS.get("integrated_gradients")(model, x, torch.tensor([1, -1]), steps=5, integration=rule,
                                              baseline=baseline, blur_sigma=1.0, normalisation=norm)
    reference = {"zero": torch.zeros_like(x), "black": norm.black(x), "blur": gaussian_blur(x, 1.0)}[baseline]
    c = out.targets
    expected = model(x).gather(1, c[:, None]).squeeze(1) - model(reference).gather(1, c[:, None]).squeeze(1)
    torch.testing.assert_close(out.maps.flatten(1).sum(1), expected, rtol=1e-10, atol=1e-10)


def test_integrated_gradients_completeness_on_a_relu_network_with_enough_steps(small_cnn, inputs):
    """Σ attributions → f(x) - f(x') as the steps grow (the integrand is piecewise constant)."""
    targets = torch.tensor([-1, 2, 7])
    norm = InputNormalisation()
    logits = small_cnn(inputs)
    out = METHODS.get("integrated_gradients")(small_cnn, inputs, targets, steps=128, chunk_size=128,
                                              integration="riemann_middle", normalisation=norm)
    c = out.targets[:, None]
    gap = logits.gather(1, c) - small_cnn(norm.black(inputs)).gather(1, c)
    error = (out.maps.flatten(1).sum(1) - gap.squeeze(1)).abs() / gap.squeeze(1).abs()
    assert (error < 0.02).all(), error
    coarse = METHODS.get("integrated_gradients")(small_cnn, inputs, targets, steps=4,
                                                 integration="riemann_middle", normalisation=norm)
    coarse_error = (coarse.maps.flatten(1).sum(1) - gap.squeeze(1)).abs() / gap.squeeze(1).abs()
    assert coarse_error.mean() > error.mean()


def test_black_baseline_is_black_in_pixel_space_for_the_models_normalisation():
    norm = InputNormalisation(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    black = norm.black(torch.zeros(1, 3, 2, 2))
    assert torch.equal(black, torch.full((1, 3, 2, 2), -1.0))
    assert torch.allclose(norm.to_pixels(black), torch.zeros(1, 3, 2, 2))
    imagenet = InputNormalisation().black(torch.zeros(1, 3, 1, 1)).flatten()
    assert torch.allclose(imagenet, torch.tensor([-0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225]))


def test_the_explainer_hands_its_normalisation_to_integrated_gradients():
    """Through the Explainer, the black baseline is the model's black: completeness against f(black) holds."""
    model = linear_model().float()
    x = torch.randn(1, 3, 8, 8)
    norm = InputNormalisation(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    [e] = Explainer(model, normalisation=norm).explain(x, method="integrated_gradients", reduce="abs_sum",
                                                        steps=4, baseline="black")
    direct = METHODS.get("integrated_gradients")(model, x, torch.tensor([e.target]), steps=4, normalisation=norm)
    scale = direct.maps.abs().sum(1).amax().item()
    assert e.attribution_scale == pytest.approx(scale, rel=1e-5)
    gap = (model(x) - model(torch.full_like(x, -1.0)))[0, e.target]
    assert direct.maps.sum().item() == pytest.approx(gap.item(), rel=1e-4)


def test_integrated_gradients_does_not_depend_on_the_chunk_size(small_cnn, inputs):
    targets = torch.tensor([-1, 2, 7])
    one = METHODS.get("integrated_gradients")(small_cnn, inputs, targets, steps=6, chunk_size=1)
    many = METHODS.get("integrated_gradients")(small_cnn, inputs, targets, steps=6, chunk_size=1000)
    torch.testing.assert_close(one.maps, many.maps, rtol=1e-12, atol=1e-14)


def test_integrated_gradients_never_runs_more_than_a_chunk_of_path_points_at_once(small_cnn, inputs):
    spy = BatchSizeSpy(small_cnn)
    seen = spy.batch_sizes
    METHODS.get("integrated_gradients")(spy, inputs, torch.tensor([-1, -1, -1]), steps=10, chunk_size=4)
    assert seen[0] == 3  # the clean forward for the logits and the targets
    assert max(seen[1:]) == 4 and sum(seen[1:]) == 30


# -- SmoothGrad ---------------------------------------------------------------


def test_smoothgrad_is_deterministic_for_a_seed_and_changes_with_it(small_cnn, inputs):
    targets = torch.tensor([-1, 2, 7])
    a = METHODS.get("smoothgrad")(small_cnn, inputs, targets, samples=5, seed=3)
    b = METHODS.get("smoothgrad")(small_cnn, inputs, targets, samples=5, seed=3, chunk_size=2)
    c = METHODS.get("smoothgrad")(small_cnn, inputs, targets, samples=5, seed=4)
    torch.testing.assert_close(a.maps, b.maps, rtol=1e-12, atol=1e-14)
    assert not torch.allclose(a.maps, c.maps)


def test_smoothgrad_reduces_to_the_gradient_as_the_noise_vanishes(small_cnn, inputs):
    targets = torch.tensor([-1, 2, 7])
    grad = METHODS.get("gradient")(small_cnn, inputs, targets).maps
    for noise in (0.0, 1e-9):
        smooth = METHODS.get("smoothgrad")(small_cnn, inputs, targets, samples=6, noise=noise).maps
        torch.testing.assert_close(smooth, grad, rtol=1e-9, atol=1e-12)
    noisy = METHODS.get("smoothgrad")(small_cnn, inputs, targets, samples=6, noise=0.2).maps
    assert not torch.allclose(noisy, grad, rtol=1e-3, atol=1e-6)


# -- Grad-CAM -----------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18():
    return kaiming_resnet18()


def test_grad_cam_is_non_negative_at_input_resolution_and_defaults_to_the_last_conv_stage(resnet18):
    x = torch.randn(2, 3, 64, 48)
    auto = METHODS.get("grad_cam")(resnet18, x, torch.tensor([-1, 3]))
    assert auto.maps.shape == (2, 1, 64, 48)
    assert (auto.maps >= 0).all() and (auto.maps.flatten(1).amax(1) > 0).all()
    layer4 = METHODS.get("grad_cam")(resnet18, x, torch.tensor([-1, 3]), layer="layer4")
    last_site = METHODS.get("grad_cam")(resnet18, x, torch.tensor([-1, 3]), layer="layer4.1.relu#2")
    assert torch.equal(auto.maps, layer4.maps) and torch.equal(auto.maps, last_site.maps)
    layer3 = METHODS.get("grad_cam")(resnet18, x, torch.tensor([-1, 3]), layer="layer3")
    assert not torch.allclose(layer3.maps, auto.maps)


def test_grad_cam_of_a_module_followed_by_an_inplace_activation_is_that_modules_output(resnet18):
    """``bn1`` is overwritten by the stem's in-place ReLU; the capture still sees the BatchNorm output."""
    x = torch.randn(1, 3, 32, 32)
    out = METHODS.get("grad_cam")(resnet18, x, torch.tensor([-1]), layer="bn1")
    assert out.maps.shape == (1, 1, 32, 32) and (out.maps >= 0).all()


def test_grad_cam_refuses_a_layer_the_network_overwrites_in_place_and_captures_a_named_module_instead():
    class OverwritesItsLastActivation(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            x = torch.nn.functional.leaky_relu(self.conv(x), 0.1)  # saves its input, not its output, for backward
            x.add_(1)  # legal, but the activation's output is no longer what the activation returned
            return self.fc(x.mean(dim=(2, 3)))

    model = OverwritesItsLastActivation().eval().requires_grad_(False)
    x = torch.randn(1, 3, 8, 8)
    with pytest.raises(InvalidOption, match="overwritten in place later"):
        METHODS.get("grad_cam")(model, x, torch.tensor([0]))
    assert METHODS.get("grad_cam")(model, x, torch.tensor([0]), layer="conv").maps.shape == (1, 1, 8, 8)


@pytest.mark.parametrize("layer, message", [
    ("layer1.0.relu", "called 2 times"),  # a reused module has no single output
    ("layer9", "neither a module of this model nor one of its activation sites"),
    ("fc", "needs a \\[B, C, H, W\\] layer output"),
])
def test_grad_cam_refuses_layers_it_cannot_use_with_a_clear_message(resnet18, layer, message):
    with pytest.raises(InvalidOption, match=message):
        METHODS.get("grad_cam")(resnet18, torch.randn(1, 3, 32, 32), torch.tensor([-1]), layer=layer)


@pytest.mark.parametrize("architecture", ["convnext_tiny", "swin_t", "maxvit_t"])
def test_grad_cam_never_reads_a_channels_last_or_token_activation_as_a_feature_map(architecture):
    """ConvNeXt's and Swin's MLP activations are [H, W, C] per sample, MaxViT's [windows, tokens, C]: read as
    [C, H, W] they drew stripes. Automatic choice passes over them (and over a squeeze-excitation's [C, 1, 1]
    gate) to the last feature map, or refuses when there is none; a [B, C, H, W] module output works."""
    from handler.engine.baselines import capture_layer

    torch.manual_seed(0)
    model = getattr(torchvision.models, architecture)(weights=None).eval().requires_grad_(False)
    x = torch.randn(1, 3, 224, 224)
    if architecture == "maxvit_t":
        with explaining(model):
            captured, _ = capture_layer(model, x, "auto")
        assert captured.source == "activation site 'blocks.3.layers.1.layers.MBconv.layers.conv_b.2'"
        assert captured.tensor.shape == (1, 2048, 7, 7)
        return
    with explaining(model), pytest.raises(InvalidOption) as info:
        METHODS.get("grad_cam")(model, x, torch.tensor([-1]))
    assert info.value.code == "invalid_layer" and "no activation with a [C, H, W] output" in str(info.value)
    if architecture == "convnext_tiny":
        with explaining(model):
            maps = METHODS.get("grad_cam")(model, x, torch.tensor([-1]), layer="features.7").maps
            assert maps.shape == (1, 1, 224, 224)
            with pytest.raises(InvalidOption, match="reads as \\[B, H, W, C\\] or tokens"):
                METHODS.get("grad_cam")(model, x, torch.tensor([-1]), layer="features.7.2.block.4")


@pytest.mark.parametrize("shape, reads", [
    ((512, 7, 7), True), ((2048, 10, 10), True), ((64, 56, 56), True), ((768, 7, 14), False),
    ((7, 7, 768), False), ((56, 56, 96), False), ((28, 28, 192), False), ((1, 49, 2048), False),
])
def test_a_feature_map_is_told_from_a_channels_last_activation_by_its_strides(shape, reads):
    from handler.engine.baselines import is_channels_first_map

    assert is_channels_first_map(shape, (224, 224)) is reads
    assert is_channels_first_map((768, 7, 10), (224, 320))  # a wide photo downsamples both axes alike


# -- guided backprop ----------------------------------------------------------


def test_guided_backprop_equals_the_gradient_without_negative_gradient_paths():
    """Non-negative weights after the first layer: every gradient reaching a ReLU is ≥ 0, nothing to rectify."""
    torch.manual_seed(5)
    model = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 6, 3), nn.ReLU(inplace=True),
                          nn.Flatten(), nn.Linear(6 * 4 * 4, 3)).double().eval().requires_grad_(False)
    with torch.no_grad():
        model[2].weight.abs_()
        model[5].weight.abs_()
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    guided = METHODS.get("guided_backprop")(model, x, torch.tensor([0, 2]))
    plain = METHODS.get("gradient")(model, x, torch.tensor([0, 2]))
    assert torch.equal(guided.maps, plain.maps)
    with torch.no_grad():
        model[5].weight[0, :10] *= -1  # one negative path is enough to make them differ
    assert not torch.equal(METHODS.get("guided_backprop")(model, x, torch.tensor([0, 2])).maps,
                           METHODS.get("gradient")(model, x, torch.tensor([0, 2])).maps)


def test_guided_backprop_through_relu6_blocks_negative_gradients_and_saturated_units():
    """z = W x; y = v · relu6(z). Guided: ∂y/∂x = Σ_j relu(v_j · [0 < z_j < 6]) W_j."""
    model = nn.Sequential(nn.Linear(2, 4, bias=False), nn.ReLU6(), nn.Linear(4, 1, bias=False)).double()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [10.0, 0.0], [1.0, 1.0]]))
        model[2].weight.copy_(torch.tensor([[1.0, -1.0, 1.0, 2.0]]))
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)  # z = [1, 2, 10 (saturated), 3]
    guided = METHODS.get("guided_backprop")(model.eval().requires_grad_(False), x, torch.tensor([0]))
    # unit 0 passes +1·[1, 0]; unit 1's gradient is negative; unit 2 is saturated; unit 3 passes +2·[1, 1]
    assert guided.maps.tolist() == [[3.0, 2.0]]
    plain = METHODS.get("gradient")(model, x, torch.tensor([0]))
    assert plain.maps.tolist() == [[3.0, 1.0]]


def test_guided_backprop_leaves_the_forward_unchanged(small_cnn, inputs):
    guided = METHODS.get("guided_backprop")(small_cnn, inputs, torch.tensor([-1, -1, -1]))
    assert torch.equal(guided.logits, small_cnn(inputs))


# -- every method ---------------------------------------------------------------


@pytest.mark.parametrize("method", BASELINE_METHODS)
def test_batch_gives_the_same_maps_as_samples_one_by_one(small_cnn, inputs, method):
    targets = torch.tensor([-1, 2, 7])
    options = FAST_OPTIONS.get(method, {})
    batch = METHODS.get(method)(small_cnn, inputs, targets, **options)
    for b in range(inputs.shape[0]):
        one = METHODS.get(method)(small_cnn, inputs[b:b + 1], targets[b:b + 1], **options)
        assert one.targets.item() == batch.targets[b].item()
        torch.testing.assert_close(one.maps[0], batch.maps[b], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("method", BASELINE_METHODS)
def test_every_method_explains_through_the_explainer(resnet18, method):
    x = torch.randn(2, 3, 64, 64)
    explanations = Explainer(resnet18).explain(x, [None, 7], method=method, **FAST_OPTIONS.get(method, {}))
    assert [e.method for e in explanations] == [method, method]
    assert explanations[1].target == 7
    for e in explanations:
        assert e.attribution.shape == (64, 64) and e.pathway is None
        if e.attribution_scale == 0:  # Grad-CAM of a class the layer holds no evidence for: said, not hidden
            assert method == "grad_cam" and e.target == 7 and "finds no input evidence" in e.notes[0]
        else:
            assert e.notes == []
    assert explanations[0].attribution_scale > 0


@pytest.mark.parametrize("registry", [METHODS, SELECTIONS], ids=["methods", "selections"])
def test_declared_option_defaults_are_the_functions_defaults(registry):
    """A request that sets nothing and one that sets every default must mean the same thing."""
    for name in registry.names():
        entry = registry.get(name)
        parameters = inspect.signature(entry.fn).parameters
        for option, spec in entry.options.items():
            assert option in parameters, (name, option)
            assert parameters[option].default == spec.default, (name, option)


@pytest.mark.parametrize("method, options, message", [
    ("integrated_gradients", {"steps": 257}, "steps must be at most 256, got 257"),
    ("integrated_gradients", {"steps": 1}, "steps must be at least 2"),
    ("integrated_gradients", {"baseline": "white"}, "baseline must be one of black, zero, blur"),
    ("integrated_gradients", {"integration": "simpson"}, "integration must be one of"),
    ("integrated_gradients", {"chunk_size": 0}, "chunk_size must be at least 1"),
    ("smoothgrad", {"samples": 10_000}, "samples must be at most 256"),
    ("smoothgrad", {"noise": -0.1}, "noise must be at least 0"),
    ("smoothgrad", {"seed": "abc"}, "seed must be an integer"),
    ("grad_cam", {"steps": 4}, "option 'steps' does not apply to method 'grad_cam'"),
    ("pathway_gradient", {"iterations": 5000, "selection": "pruning_gates"}, "iterations must be at most 1000"),
    ("pathway_gradient", {"copies": 1, "selection": "resampling_precision"}, "copies must be at least 2"),
])
def test_options_are_validated_with_a_clear_message(resnet18, method, options, message):
    from handler.engine import ExplainRequest

    options = dict(options)
    selection = options.pop("selection", None)
    request = ExplainRequest(method=method, selection=selection, options=tuple(sorted(options.items())))
    with pytest.raises(InvalidOption, match=message):
        Explainer(resnet18).validate(request)


def test_cli_refuses_steps_above_the_cap_before_any_work(capsys, tmp_path):
    from handler.cli import run

    code = run(["--out", str(tmp_path), "--method", "integrated_gradients", "--option", "steps=1000",
                "nonexistent.jpg"])
    assert code == 2
    assert "steps must be at most 256" in capsys.readouterr().err
