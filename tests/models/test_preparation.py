"""Inference preparation (handler.models.preparation): exact in eval mode, every activation site kept."""

import copy
import json

import numpy as np
import pytest
import timm
import torch
import torchvision
from torch import nn

from handler import ExplanationService
from handler.engine.sites import trace_sites
from handler.models import ModelLoadError, ModelSpec, UNPREPARED, Preparation, get_spec, load_model
from handler.models import preparation
from handler.models.preparation import FrozenPredictor, SamePaddedConv2d, fold_batchnorms, fold_same_padding, \
    frozen_predictor, prepare_model
from handler.schema import parse_options


def _random(model: nn.Module) -> nn.Module:
    """Random weights and non-trivial BatchNorm statistics (a fresh BatchNorm is the identity)."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
    return model.eval().requires_grad_(False)


CLASSIFIERS = {
    "resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "mobilenet_v3_small": lambda: torchvision.models.mobilenet_v3_small(num_classes=10),
    "efficientnet_b0": lambda: torchvision.models.efficientnet_b0(num_classes=10),
    "regnet_y_400mf": lambda: torchvision.models.regnet_y_400mf(num_classes=10),
    "convnext_tiny": lambda: torchvision.models.convnext_tiny(num_classes=10),
    "densenet121": lambda: torchvision.models.densenet121(num_classes=10),
    "timm_vit_tiny": lambda: timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=10),
    "timm_efficientnet_lite0": lambda: timm.create_model("tf_efficientnet_lite0", num_classes=10),
}
#: How many BatchNorms directly follow a convolution in each (the ones a correct fold must find).
FOLDABLE = {"resnet18": 20, "mobilenet_v3_small": 34, "efficientnet_b0": 49, "regnet_y_400mf": 53,
            "convnext_tiny": 0, "densenet121": 59, "timm_vit_tiny": 0, "timm_efficientnet_lite0": 49}
#: How many convolutions pad a copy of their input for TF-"same" padding (timm's ``Conv2dSame``): the stem and
#: the four strided depthwise convolutions of the TF-ported EfficientNet-Lite0.
SAME_PADDED = {"timm_efficientnet_lite0": 5}


def _max_relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("name", sorted(CLASSIFIERS))
def test_folding_and_channels_last_keep_outputs_and_activation_sites(name):
    model = _random(CLASSIFIERS[name]())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(x)
    layout = trace_sites(model, x)
    prepared = copy.deepcopy(model)
    folded = fold_batchnorms(prepared)
    assert len(folded) == FOLDABLE[name]
    for conv_path, bn_path in folded:
        assert not isinstance(prepared.get_submodule(bn_path), nn.modules.batchnorm._BatchNorm)
        assert prepared.get_submodule(conv_path).bias is not None
    padded = fold_same_padding(prepared)
    assert len(padded) == SAME_PADDED.get(name, 0)
    assert all(type(prepared.get_submodule(path)) is SamePaddedConv2d for path in padded)
    prepared.to(memory_format=torch.channels_last)
    with torch.no_grad():
        got = prepared(x)
    assert _max_relative_error(got, expected) < 1e-4
    assert trace_sites(prepared, x) == layout


def test_efficientnet_lite0_with_its_weights_is_prepared_exactly_and_keeps_every_site():
    as_trained = load_model("efficientnet_lite0", prepare=False).module
    spec = get_spec("efficientnet_lite0")
    loaded = load_model(spec.replace(prepare=Preparation(explain_prepared=True, memory_format="channels_last")))
    assert loaded.preparation.reverted is None
    assert len(loaded.preparation.folded) == 49
    assert len(loaded.preparation.padded) == 5
    assert not any(type(m).__name__ == "Conv2dSame" for m in loaded.module.modules())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in loaded.module.modules())
    assert loaded.module.conv_head.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(3, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = as_trained(x)
        got = loaded.module(x)
    assert _max_relative_error(got, expected) < 1e-4
    assert (got.argmax(1) == expected.argmax(1)).all()
    assert trace_sites(loaded.module, x) == trace_sites(as_trained, x)


SAME_PADDING_CASES = [
    # (in, out, groups, kernel, stride, dilation, (height, width)): even and odd sizes, so the padding is
    # asymmetric in one dimension, both or neither
    (6, 6, 6, 3, 2, 1, (16, 16)),
    (6, 6, 6, 5, 2, 1, (15, 16)),
    (6, 6, 6, 3, 2, 1, (17, 15)),
    (3, 8, 1, 3, 2, 1, (16, 17)),
    (4, 5, 1, (3, 5), (2, 1), 1, (14, 13)),
    (4, 4, 4, 5, 1, 1, (12, 12)),
    (4, 4, 2, 4, 2, 1, (12, 11)),  # an even kernel
    (4, 4, 4, 3, 2, 2, (16, 16)),  # dilated and asymmetric: the explicit pad stays
    (4, 4, 4, 3, 1, 2, (13, 13)),  # dilated and symmetric
    (4, 4, 1, 1, 2, 1, (16, 16)),  # no padding at all
]


@pytest.mark.parametrize("case", SAME_PADDING_CASES, ids=[str(i) for i in range(len(SAME_PADDING_CASES))])
def test_same_padded_convolution_computes_what_timms_padded_copy_computes(case):
    from timm.layers import Conv2dSame

    in_channels, out_channels, groups, kernel, stride, dilation, size = case
    torch.manual_seed(0)
    reference = Conv2dSame(in_channels, out_channels, kernel, stride, dilation=dilation, groups=groups).eval()
    replaced = SamePaddedConv2d.from_conv(reference)
    assert replaced.weight is reference.weight and replaced.bias is reference.bias
    for layout in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, in_channels, *size).contiguous(memory_format=layout).requires_grad_(True)
        expected = reference(x)
        got = replaced(x)
        assert got.shape == expected.shape
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        grad = torch.randn_like(expected)
        torch.testing.assert_close(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(expected, x, grad)[0],
                                   rtol=1e-5, atol=1e-6)


def test_same_padded_convolution_reads_its_weight_at_each_call():
    """The evaluation suite re-initialises weights in place: nothing derived from them may be kept."""
    from timm.layers import Conv2dSame

    reference = Conv2dSame(3, 3, 3, 2, groups=3)
    conv = SamePaddedConv2d.from_conv(reference)  # shares the weight and bias
    x = torch.randn(1, 3, 8, 8)
    before = conv(x)
    with torch.no_grad():
        reference.weight.normal_()
        reference.bias.zero_()
        after = conv(x)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(after, reference(x))


def test_only_timms_own_same_padded_convolutions_are_replaced():
    from timm.layers import Conv2dSame

    class Subclass(Conv2dSame):  # may use its weight in its own way
        pass

    shared = Conv2dSame(3, 3, 3, 2)
    model = nn.Sequential(Conv2dSame(3, 3, 3, 2), Subclass(3, 3, 3, 2), shared, shared, nn.Conv2d(3, 3, 3))
    hooked = Conv2dSame(3, 3, 3, 2)
    hooked.register_forward_hook(lambda *_: None)
    model.append(hooked)
    assert fold_same_padding(model) == ["0"]
    assert type(model[0]) is SamePaddedConv2d and type(model[1]) is Subclass and model[2] is shared


def test_the_padding_fold_is_switchable_and_named_in_the_preparation():
    spec = get_spec("efficientnet_lite0")
    unfolded = load_model(spec.replace(prepare=Preparation(fold_padding=False)))
    assert unfolded.preparation.padded == []
    assert sum(type(m).__name__ == "Conv2dSame" for m in unfolded.module.modules()) == 5
    assert unfolded.explained_preparation == "49 BatchNorm(s) folded, channels_last"
    assert Preparation.from_value({"fold_padding": False}) == Preparation(fold_padding=False)
    with pytest.raises(preparation.PreparationError, match="fold_padding"):
        Preparation.from_value({"fold_padding": "no"})
    # "auto", the default: on the CPU, where it was measured; not on a GPU, where it was not
    assert Preparation().fold_padding == "auto" == Preparation.from_value({"fold_padding": "auto"}).fold_padding
    assert Preparation().resolved_fold_padding(torch.device("cpu"))
    assert not Preparation().resolved_fold_padding(torch.device("cuda"))
    assert Preparation(fold_padding=True).resolved_fold_padding(torch.device("cuda"))
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(load_model(spec).module(x), unfolded.module(x), rtol=1e-5, atol=1e-5)


class SharedOutput(nn.Module):
    """The convolution's output feeds the BatchNorm and a skip: folding would change the skip."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return torch.relu(self.bn(y)) + y


class Untraceable(nn.Module):
    """Data-dependent Python control flow: fx cannot trace it, its Sequential child is still folded."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.conv = nn.Conv2d(4, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        x = self.stem(x)
        if x.mean() > 0:  # fx cannot decide this
            x = x * 2
        return torch.relu(self.bn(self.conv(x)))


class CalledTwice(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)

    def forward(self, x):
        return torch.relu(self.bn(self.conv(x))) + self.conv(x)


def test_pairs_that_cannot_be_proven_are_left_unfolded():
    assert fold_batchnorms(_random(SharedOutput())) == []
    assert fold_batchnorms(_random(CalledTwice())) == []
    model = _random(Untraceable())
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    # The root does not trace; inside it only the Sequential stem is provably conv -> BatchNorm.
    assert fold_batchnorms(model) == [("stem.0", "stem.1")]
    assert isinstance(model.bn, nn.BatchNorm2d)
    with torch.no_grad():
        assert _max_relative_error(model(x), expected) < 1e-5


def test_a_preparation_that_changes_the_outputs_is_discarded(monkeypatch):
    model = _random(torchvision.models.resnet18(num_classes=10))
    x = torch.randn(1, 3, 64, 64)

    def broken_fold(m):
        folded = fold_batchnorms(m)
        with torch.no_grad():
            m.conv1.weight.mul_(1.5)
        return folded

    monkeypatch.setattr(preparation, "fold_batchnorms", broken_fold)
    kept, report = prepare_model(model, Preparation(), x)
    assert kept is model and report.reverted and "differ" in report.reverted
    assert isinstance(model.bn1, nn.BatchNorm2d)


def test_the_spec_switches_preparation_off_and_rejects_a_malformed_entry(tmp_path):
    data = get_spec("efficientnet_lite0").to_dict()
    assert "prepare" not in data  # the default is not written out
    off = ModelSpec.from_dict(dict(data, prepare=False))
    assert off.prepare == UNPREPARED and off.to_dict()["prepare"] is False
    chosen = ModelSpec.from_dict(dict(data, prepare={"memory_format": "contiguous", "predict": "eager"}))
    assert ModelSpec.from_dict(chosen.to_dict()).prepare == chosen.prepare
    for bad, field in [({"memory_format": "nhwc"}, "memory_format"), ({"fold": True}, "fold"),
                       ({"predict": "compiled"}, "predict"), ("yes", "prepare")]:
        with pytest.raises(ModelLoadError, match=field):
            ModelSpec.from_dict(dict(data, prepare=bad))
    spec_file = tmp_path / "digits.json"
    digits = get_spec("synthetic_digits_cnn")
    spec_file.write_text(json.dumps(dict(digits.to_dict(), prepare=False,
                                         weights={"file": str(digits.resolve(digits.weights.file))})))
    loaded = load_model(spec_file)
    assert loaded.preparation.folded == [] and isinstance(loaded.module.features.block1[1], nn.BatchNorm2d)
    assert len(load_model("synthetic_digits_cnn", predictor=True).preparation.folded) == 5
    assert load_model("synthetic_digits_cnn", predictor=True, prepare=False).predictor is None


def test_predictions_share_the_prepared_model_except_a_lone_image_on_the_cpu():
    loaded = load_model("synthetic_digits_cnn", predictor=True)
    # the CPU default: a frozen copy for a batch of one, the explained (prepared) model for larger batches
    assert isinstance(loaded.predictor, FrozenPredictor) and loaded.predictor.largest_batch == 1
    assert loaded.predictor.eager[0] is loaded.module
    calls = []
    hook = loaded.module.register_forward_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        loaded.predictor(torch.randn(1, 3, 112, 112))
        assert calls == []  # the frozen copy
        loaded.predictor(torch.randn(4, 3, 112, 112))
        assert calls == [1]  # the eager model
    hook.remove()
    assert isinstance(loaded.module.features.block1[1], nn.Identity)
    assert loaded.module.features.block1[0].weight.is_contiguous(memory_format=torch.channels_last)  # CPU default
    assert loaded.explains_prepared and loaded.explained_preparation == "5 BatchNorm(s) folded, channels_last"
    as_trained = load_model(get_spec("synthetic_digits_cnn").replace(prepare=Preparation(explain_prepared=False)),
                            predictor=True)
    assert isinstance(as_trained.module.features.block1[1], nn.BatchNorm2d)  # explained as trained
    assert isinstance(as_trained.predictor.eager[0].features.block1[1], nn.Identity)  # predictions: a prepared copy
    assert as_trained.explained_preparation == "none"
    assert load_model("synthetic_digits_cnn").predictor is None  # only the server asks for one


def test_the_frozen_predictor_agrees_with_the_eager_model_and_hands_other_shapes_to_it():
    loaded = load_model(get_spec("synthetic_digits_cnn").replace(prepare=Preparation(predict="frozen")),
                        predictor=True)
    assert isinstance(loaded.predictor, FrozenPredictor) and loaded.predictor.channels_last  # the CPU's format
    assert loaded.predictor.largest_batch is None  # every batch
    x = torch.randn(4, 3, 112, 112)
    with torch.no_grad():
        assert _max_relative_error(loaded.predictor(x), loaded.module(x)) < 1e-4
        other = torch.randn(2, 3, 96, 96)
        assert _max_relative_error(loaded.predictor(other), loaded.module(other)) < 1e-4


class BakedBatch(nn.Module):
    """A trace records ``int(x.shape[0])`` as a constant: its frozen copy only takes the traced batch size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return torch.relu(self.conv(x)).reshape(int(x.shape[0]), -1)[:, :10]


def test_a_frozen_copy_that_does_not_agree_with_the_eager_model_is_not_used():
    model = BakedBatch().eval().requires_grad_(False)
    assert frozen_predictor(model, torch.randn(1, 3, 8, 8)) is None
    assert frozen_predictor(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten()).eval(), torch.randn(1, 3, 8, 8)) \
        is not None


@pytest.fixture(scope="module")
def unprepared_service():
    return ExplanationService(load_model("efficientnet_lite0", prepare=False))


@pytest.fixture(scope="module")
def prepared_service():
    return ExplanationService(load_model("efficientnet_lite0", predictor=True))


@pytest.fixture
def two_threads():
    """The neuron threshold is sensitive to float rounding, so a map's near-tie neurons depend on the thread count
    as on the preparation (the trained model alone at 1 thread instead of 2: Pearson 0.84 on the astronaut).
    The comparison is made at one fixed count, this 2-core machine's default."""
    from handler.service import cpu_threads

    with cpu_threads(2):
        yield


def test_explanations_and_predictions_are_unchanged_by_preparation(photos, unprepared_service, prepared_service,
                                                                   two_threads):
    assert prepared_service.predictor.eager[0] is prepared_service.explainer.model  # one prepared model
    # explanations run it too
    assert prepared_service.preparation == "49 BatchNorm(s) folded, 5 same padding(s) folded, channels_last"
    images = [prepared_service.decode(path.read_bytes()) for path in photos.values()]
    options = [parse_options({})] * len(images)
    before = unprepared_service.explain(images, options, attribution_dtype=np.float32)
    after = prepared_service.explain(images, options, attribution_dtype=np.float32)
    for name, a, b in zip(photos, before, after):
        assert a.document["predictions"][0]["index"] == b.document["predictions"][0]["index"], name
        target_a, target_b = a.document["explanation"]["target"], b.document["explanation"]["target"]
        assert target_a["index"] == target_b["index"], name
        assert target_a["probability"] == pytest.approx(target_b["probability"], abs=1e-3), name
        r = np.corrcoef(a.attribution.ravel(), b.attribution.ravel())[0, 1]
        assert r >= 0.99, (name, r)
    predicted_before = unprepared_service.predict(images, options)
    predicted_after = prepared_service.predict(images, options)
    for a, b in zip(predicted_before, predicted_after):
        assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]]
        assert [p["probability"] for p in a["predictions"]] == pytest.approx(
            [p["probability"] for p in b["predictions"]], abs=1e-4)


def test_auto_memory_format_is_channels_last_for_convolutions_on_the_cpu_only():
    from handler.models.preparation import memory_format_for

    convolutional = torchvision.models.resnet18(num_classes=10)
    assert memory_format_for(convolutional, torch.device("cpu")) == "channels_last"
    assert memory_format_for(convolutional, torch.device("cuda")) == "contiguous"  # not measured on a GPU
    assert memory_format_for(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), torch.device("cpu")) == "contiguous"


def test_auto_memory_format_applies_without_folding():
    """``fold_batchnorm: false`` leaves the BatchNorms but ``memory_format: auto`` still lays the explained model out
    channels-last on the CPU (and it says so in its provenance)."""
    loaded = load_model(get_spec("synthetic_digits_cnn").replace(prepare=Preparation(fold_batchnorm=False)))
    assert isinstance(loaded.module.features.block1[1], nn.BatchNorm2d)
    assert loaded.module.features.block1[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert loaded.explained_preparation == "0 BatchNorm(s) folded, channels_last"


def test_a_preparation_discarded_by_a_bare_assertion_names_the_exception(monkeypatch, caplog):
    """A model's own ``assert`` (timm's HaloNet checks its input size so) has no message: the report and the log
    still say what discarded the preparation."""
    model = _random(torchvision.models.resnet18(num_classes=10))

    def bare_assert(m):
        raise AssertionError()

    monkeypatch.setattr(preparation, "fold_batchnorms", bare_assert)
    with caplog.at_level("WARNING"):
        kept, report = prepare_model(model, Preparation(), torch.randn(1, 3, 64, 64))
    assert kept is model and report.reverted == "AssertionError"
    assert caplog.messages[-1] == "model preparation discarded, serving the model unprepared: AssertionError"
