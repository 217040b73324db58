"""The embedded default model on real photos, checked against an independent implementation of the method."""

import json

import numpy as np
import pytest

from handler import parse_options
from handler.models import get_spec, load_model
from reference_pathway import reference_pathway_gradient

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def test_spec_is_data_and_round_trips():
    spec = get_spec("efficientnet_lite0")
    assert spec.architecture == "timm:tf_efficientnet_lite0"
    assert spec.preprocessing.mean == (0.5, 0.5, 0.5) and spec.preprocessing.crop == 224
    again = type(spec).from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again.to_dict() == spec.to_dict()


def test_weights_map_in_order_onto_timm_and_give_imagenet_predictions(lite0_service, photos):
    image = lite0_service.decode(photos["coffee"].read_bytes())
    [doc] = lite0_service.predict([image], [parse_options({})])
    assert doc["predictions"][0]["label"] == "espresso"
    assert doc["predictions"][0]["probability"] > 0.9


def test_coffee_is_explained_as_espresso_and_the_pathway_keeps_the_prediction(lite0_service, photos):
    image = lite0_service.decode(photos["coffee"].read_bytes())
    [result] = lite0_service.explain([image], [parse_options({"sparsity": 0.7})])
    explanation = result.document["explanation"]
    assert explanation["target"]["label"] == "espresso"
    assert explanation["target"]["pathway_probability"] > 0.9  # authors' claim: the pathway keeps the response
    pathway = explanation["pathway"]
    assert 0.7 <= pathway["realised_sparsity"] < 0.71
    assert pathway["total_neurons"] == sum(s["total"] for s in pathway["sites"])
    assert pathway["kept_neurons"] == sum(s["kept"] for s in pathway["sites"])
    assert 6_000_000 < pathway["total_neurons"] < 6_400_000
    assert {s["kind"] for s in pathway["sites"]} == {"relu6"}
    assert result.attribution.shape == (224, 224)
    assert np.abs(result.attribution).max() == pytest.approx(1.0)


def test_chelsea_is_a_cat(lite0_service, photos):
    image = lite0_service.decode(photos["chelsea"].read_bytes())
    [result] = lite0_service.explain([image], [parse_options({})])
    assert result.document["explanation"]["target"]["index"] in CAT_CLASSES


@pytest.mark.parametrize("photo, target", [("chelsea", 285), ("rocket", None)])
def test_attribution_agrees_with_an_independent_implementation(lite0_service, photos, photo, target):
    image = lite0_service.decode(photos[photo].read_bytes())
    [result] = lite0_service.explain([image], [parse_options({"sparsity": 0.7, "target": target})])
    chosen = result.document["explanation"]["target"]["index"]
    x = lite0_service.preprocessor(image)[None]
    model = load_model("efficientnet_lite0").module
    expected, realised = reference_pathway_gradient(model, x, chosen, 0.7)
    r = np.corrcoef(expected.flatten(), result.attribution.flatten())[0, 1]
    assert r > 0.99, r
    assert result.document["explanation"]["pathway"]["realised_sparsity"] == pytest.approx(realised, abs=1e-4)
