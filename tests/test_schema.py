"""Request options mean the same from JSON, multipart text, headers and CLI flags; bad ones say what is wrong."""

import pytest

from handler.errors import InvalidOption
from handler.schema import Limits, parse_options
from handler.serving.responses import http_status


def test_defaults():
    o = parse_options({})
    assert (o.method, o.target, o.top_k, o.sparsity, o.outputs) == (None, None, 5, None, ("heatmap", "pathway"))


def test_text_values_from_multipart_and_headers_are_typed():
    o = parse_options({"X-Explain-Top-K": b"3", "sparsity": "0.9", "outputs": "overlay, attribution",
                       "target": bytearray(b"281")})
    assert (o.top_k, o.sparsity, o.outputs, o.target) == (3, 0.9, ("overlay", "attribution"), "281")


@pytest.mark.parametrize("raw, message", [
    ({"sparsity": 1}, "sparsity must be in [0, 1)"),
    ({"sparsity": "nan"}, "finite"),
    ({"sparsity": True}, "must be a number"),
    ({"top_k": 0}, "top_k must be between 1 and"),
    ({"top_k": 1000}, "top_k must be between 1 and 100"),
    ({"top_k": "three"}, "top_k must be an integer"),
    ({"outputs": ["heatmap", "video"]}, "unknown output 'video'"),
    ({"outputs": 5}, "outputs must be a list"),
    ({"method": "magic"}, "unknown method 'magic'"),
    ({"colormap": "rainbow"}, "unknown colormap"),
    ({"sparcity": 0.5}, "unknown option 'sparcity'"),
    ({"target": [1, 2]}, "target must be a class index or a label name"),
    ({"target": True}, "target must be a class index or a label name"),
])
def test_bad_options_are_named(raw, message):
    with pytest.raises(InvalidOption) as info:
        parse_options(raw)
    assert message in str(info.value)
    assert 400 <= http_status(info.value) < 500


@pytest.mark.parametrize("name", ["top_k", "explain_top_k"])
@pytest.mark.parametrize("text", ["+-3", "--2", "²", "٣", "3.5", "1e3", "9" * 5000])
def test_integer_text_int_cannot_read_is_an_invalid_option_quoting_at_most_a_line(name, text):
    with pytest.raises(InvalidOption) as info:
        parse_options({name: text})
    assert f"{name} must be an integer" in str(info.value) and len(str(info.value)) < 120
    assert http_status(info.value) == 400


@pytest.mark.parametrize("text, value", [("+3", 3), (" 4 ", 4), ("007", 7)])
def test_integer_text_with_a_sign_spaces_or_leading_zeros_is_read(text, value):
    assert parse_options({"top_k": text}).top_k == value


def test_targets_as_a_json_list_in_text_read_like_the_json_list():
    assert parse_options({"X-Explain-Targets": '[967, "cup"]'}).targets == parse_options(
        {"targets": [967, "cup"]}).targets == (967, "cup")
    with pytest.raises(InvalidOption, match="is not a JSON list"):
        parse_options({"targets": "[967, cup"})


@pytest.mark.parametrize("header, body", [
    ("true", True), ("TRUE", "true"), ("heatmap,pathway", ["heatmap", "pathway"]),
    ("heatmap, pathway", "heatmap,pathway"), ("967,968", [967, 968]), ("[967, 968]", [967, 968]), ("3", 3.0),
    ("0.50", 0.5), (".5", "0.5"), ("heatmap", ["heatmap"]),
])
def test_one_value_spelt_two_ways_in_two_places_is_one_value(header, body):
    from handler.schema import combine_options

    combined = combine_options(("headers", {"x-explain-value": header}), ("the JSON body", {"value": body}))
    assert combined == {"x-explain-value": header}


@pytest.mark.parametrize("header, body", [("0.5", 0.6), ("espresso", 967), ("a,b", "b,a"), ("true", "false")])
def test_two_values_in_two_places_are_refused_naming_both(header, body):
    from handler.schema import combine_options

    with pytest.raises(InvalidOption) as info:
        combine_options(("headers", {"x-explain-value": header}), ("the JSON body", {"value": body}))
    assert info.value.code == "conflicting_options" and "(headers)" in str(info.value)


def test_server_caps_apply():
    limits = Limits(max_top_k=10, allowed_methods=("pathway_gradient",))
    with pytest.raises(InvalidOption, match="between 1 and 10"):
        parse_options({"top_k": 11}, limits)
    with pytest.raises(InvalidOption, match="not enabled") as info:
        parse_options({"method": "gradient"}, limits)
    assert http_status(info.value) == 403


def test_method_and_selection_options_are_declared_typed_and_checked(lite0_service):
    from handler.service import request_of

    explainer = lite0_service.explainer
    o = parse_options({"signed": "true"})
    assert o.method_options == (("signed", "true"),)
    request = explainer.validate(request_of(o))
    assert request.options == (("signed", True),)
    with pytest.raises(InvalidOption, match="does not apply to method 'gradient'"):
        explainer.validate(request_of(parse_options({"signed": "true", "method": "gradient"})))
    with pytest.raises(InvalidOption, match="signed must be true or false"):
        explainer.validate(request_of(parse_options({"signed": "maybe"})))
    with pytest.raises(InvalidOption, match="unknown option 'frobnicate'"):
        parse_options({"frobnicate": 1})
