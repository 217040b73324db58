"""The synthetic localisation set: boxes hold the digit exactly, splits never share digits, the model reads it."""

import numpy as np
import pytest
import torch

from handler.evaluation.synthetic import SyntheticDigits, _digits


@pytest.fixture(scope="module")
def items():
    return list(SyntheticDigits("test", 40))


def test_the_box_contains_every_pixel_the_digit_touched_and_is_tight(items):
    for it in items:
        b = it.box
        inside = np.zeros_like(it.alpha, dtype=bool)
        inside[b.y0:b.y1, b.x0:b.x1] = True
        assert (it.alpha[~inside] == 0).all()
        # tight: the digit reaches every edge of its box
        assert it.alpha[b.y0, b.x0:b.x1].max() > 0 and it.alpha[b.y1 - 1, b.x0:b.x1].max() > 0
        assert it.alpha[b.y0:b.y1, b.x0].max() > 0 and it.alpha[b.y0:b.y1, b.x1 - 1].max() > 0
        assert 0 <= b.x0 < b.x1 <= 112 and 0 <= b.y0 < b.y1 <= 112


def test_strokes_stand_out_from_the_background_only_inside_the_box(items):
    for it in items:
        b = it.box
        strokes = it.image[it.alpha > 0.9].astype(float).mean()
        outside = np.ones(it.alpha.shape, dtype=bool)
        outside[b.y0:b.y1, b.x0:b.x1] = False
        assert strokes > it.image[outside].astype(float).mean() + 40


def test_images_are_reproducible_and_varied(items):
    again = SyntheticDigits("test", 40)
    assert np.array_equal(again[7].image, items[7].image) and again[7].box == items[7].box
    assert len({it.texture for it in items}) >= 4
    assert len({it.label for it in items}) >= 8
    assert len({(it.box.x0, it.box.y0) for it in items}) > 30
    other_seed = SyntheticDigits("test", 40, seed=1)
    assert not np.array_equal(other_seed[7].image, items[7].image)


def test_train_and_test_splits_use_different_digits():
    train, _ = _digits("train", 0)
    test, _ = _digits("test", 0)
    assert len(train) + len(test) == 1797 and len(test) == 500
    train_keys = {t.tobytes() for t in train}
    assert sum(t.tobytes() in train_keys for t in test) <= 2  # sklearn's set has a handful of exact duplicates


def test_batch_is_normalised_like_the_model_spec_says():
    data = SyntheticDigits("test", 3)
    x, labels, boxes = data.batch([0, 1, 2], mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    assert x.shape == (3, 3, 112, 112) and x.dtype == torch.float32
    expected = torch.from_numpy(data[1].image).permute(2, 0, 1).float() / 255 * 2 - 1
    assert torch.allclose(x[1], expected)
    assert labels.tolist() == [data[i].label for i in range(3)] and boxes[2] == data[2].box


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="split"):
        SyntheticDigits("val")
    with pytest.raises(ValueError, match="digit_size"):
        SyntheticDigits(digit_size=(40, 200))
    with pytest.raises(IndexError):
        SyntheticDigits("test", 2)[2]


def test_the_committed_model_loads_from_its_spec_and_reads_the_digits():
    from handler.models import load_model

    loaded = load_model("synthetic_digits_cnn")
    assert sum(p.numel() for p in loaded.module.parameters()) < 250_000
    prep = loaded.spec.preprocessing
    x, labels, _ = SyntheticDigits("test", 200).batch(range(200), prep.mean, prep.std)
    with torch.inference_mode():
        accuracy = (loaded.module(x).argmax(1) == labels).float().mean().item()
    assert accuracy > 0.9
