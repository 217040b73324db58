"""A spec without ``preprocessing`` gets its architecture's published one: what torchvision's default weights and
timm's pretrained configurations were evaluated with, reproduced by this project's own preprocessing to float
rounding on a real photo (a fine-tuned ViT needs ``mean = std = 0.5``, an Inception its 299-pixel crop)."""

from __future__ import annotations

import pytest
import timm
import torchvision
from PIL import Image

from handler.imaging import Preprocessor
from handler.models import ModelSpec, Preprocessing, published_preprocessing, spec_for_architecture
from handler.samples import sample_photo


@pytest.fixture(scope="module")
def cat():
    return Image.open(sample_photo("chelsea")).convert("RGB")


def _largest_difference(spec: ModelSpec, reference, image) -> float:
    ours = Preprocessor(spec.preprocessing).batch([image])[0]
    theirs = reference(image)
    assert ours.shape == theirs.shape
    return float((ours - theirs).abs().max())


@pytest.mark.parametrize("architecture", ["inception_v3", "torchvision:resnet50", "torchvision:vit_b_16"])
def test_a_torchvision_architecture_is_preprocessed_as_its_default_weights_are(architecture, cat):
    spec = spec_for_architecture(architecture, labels=None)
    name = architecture.rpartition(":")[2]
    reference = torchvision.models.get_model_weights(name).DEFAULT.transforms()
    assert _largest_difference(spec, reference, cat) < 1e-5


@pytest.mark.parametrize("architecture", ["vit_tiny_patch16_224", "inception_v3", "resnet50",
                                          "convnext_atto.d2_in1k"])
def test_a_timm_architecture_is_preprocessed_as_its_pretrained_configuration_says(architecture, cat):
    spec = ModelSpec.from_dict({"name": "mine", "architecture": f"timm:{architecture}"})  # no preprocessing given
    config = timm.data.resolve_data_config({}, model=timm.create_model(architecture, pretrained=False))
    assert _largest_difference(spec, timm.data.create_transform(**config), cat) < 1e-5


def test_the_published_preprocessing_is_what_moves_a_vit_off_the_imagenet_defaults():
    vit = published_preprocessing("timm:vit_tiny_patch16_224")
    assert vit.mean == vit.std == (0.5, 0.5, 0.5) and vit.interpolation == "bicubic"
    assert published_preprocessing("inception_v3").crop == 299


def test_given_preprocessing_fields_override_only_themselves():
    spec = ModelSpec.from_dict({"name": "mine", "architecture": "timm:vit_tiny_patch16_224",
                                "preprocessing": {"jpeg_draft": False, "crop": 192}})
    published = published_preprocessing("timm:vit_tiny_patch16_224")
    assert spec.preprocessing.jpeg_draft is False and spec.preprocessing.crop == 192
    assert (spec.preprocessing.mean, spec.preprocessing.resize) == (published.mean, published.resize)
    assert ModelSpec.from_dict(spec.to_dict()) == spec  # an archive's spec carries it explicitly


def test_an_architecture_nobody_publishes_preprocessing_for_gets_the_defaults():
    assert published_preprocessing("handler:digits_cnn") is None
    assert published_preprocessing("timm:no_such_model") is None
    assert spec_for_architecture("handler:digits_cnn", labels=None).preprocessing == Preprocessing()
