"""A model spec, class names or weights that no image could be served with fail when they are read, with one line
naming the field or the file, not later on every image or as an internal error."""

from __future__ import annotations

import json

import pytest
import torch

from handler.models import ModelLoadError, ModelSpec, get_spec, read_labels_file, read_state_dict


def _spec_with(**changes) -> dict:
    data = get_spec("efficientnet_lite0").to_dict()
    for key, value in changes.items():
        data[key] = {**data[key], **value} if isinstance(value, dict) and isinstance(data.get(key), dict) else value
    return data


@pytest.mark.parametrize("changes, says", [
    ({"preprocessing": {"interpolation": "lanczos9"}}, "preprocessing.interpolation must be one of nearest"),
    ({"preprocessing": {"mean": [0.5, 0.5]}}, "preprocessing.mean must be a list of 3 numbers"),
    ({"preprocessing": {"mean": "0.5"}}, "preprocessing.mean must be a list of 3 numbers"),
    ({"preprocessing": {"std": [0, 0, 0]}}, "preprocessing.std must be positive"),
    ({"preprocessing": {"crop": "224"}}, "preprocessing.crop must be a positive whole number"),
    ({"preprocessing": {"crop": 300}}, "preprocessing.crop (300) must be at most preprocessing.resize (256)"),
    ({"preprocessing": {"resize": 0}}, "preprocessing.resize must be a positive whole number"),
    ({"preprocessing": [1, 2]}, "preprocessing must be an object of fields"),
    ({"architecture": 5}, "architecture must be a string"),
    ({"num_classes": "3"}, "num_classes must be a positive whole number"),
    ({"defaults": [1, 2]}, "defaults must be an object of fields"),
    ({"defaults": {"bogus": 1}}, "unknown defaults bogus"),
    ({"defaults": {"sparsity": 1}}, "defaults: sparsity must be in [0, 1)"),
    ({"defaults": {"method": "magic"}}, "defaults: unknown explanation method 'magic'"),
])
def test_a_spec_field_no_image_could_be_served_with_is_named_when_the_spec_is_read(changes, says):
    with pytest.raises(ModelLoadError) as info:
        ModelSpec.from_dict(_spec_with(**changes))
    assert says in str(info.value) and "\n" not in str(info.value)


def test_a_spec_that_is_not_an_object_is_refused_as_such():
    with pytest.raises(ModelLoadError, match="a model spec is a JSON object of fields, not list"):
        ModelSpec.from_dict([1, 2])


def test_the_builtin_specs_read_back_unchanged():
    for name in ("efficientnet_lite0", "synthetic_digits_cnn"):
        spec = get_spec(name)
        assert ModelSpec.from_dict(spec.to_dict(), base_dir=spec.base_dir) == spec


@pytest.mark.parametrize("content, says", [
    ("[1, 2", "is not valid JSON"),
    (b"\x89PNG\r\n\x1a\n\xff\xfe", "is not UTF-8 text"),
    ({"0": "a", "2": "b"}, "class indices must run 0..1 without gaps"),
])
def test_a_labels_file_that_cannot_be_read_says_which_and_why(tmp_path, content, says):
    path = tmp_path / "labels.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(ModelLoadError) as info:
        read_labels_file(path)
    assert says in str(info.value) and str(path) in str(info.value)


def test_a_labels_directory_is_not_reported_as_missing(tmp_path):
    with pytest.raises(ModelLoadError, match="is a directory"):
        read_labels_file(tmp_path)


@pytest.mark.parametrize("saved, says", [
    (b"not a torch file", "Unsupported operand"),
    (torch.nn.Linear(2, 2), "Unsupported global: GLOBAL torch.nn.modules.linear.Linear"),
])
def test_a_weights_file_that_is_not_a_state_dict_is_one_line_without_torchs_advice(tmp_path, saved, says):
    path = tmp_path / "weights.pt"
    if isinstance(saved, bytes):
        path.write_bytes(saved)
    else:
        torch.save(saved, path)
    with pytest.raises(ModelLoadError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert says in message and "save model.state_dict()" in message
    assert "\n" not in message and "weights_only` set to `False`" not in message
