"""Each evaluation metric on constructed cases whose answer is known in advance."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from handler.engine import Explainer
from handler.evaluation import (Box, blurred, energy_in_box, insertion_deletion, localisation, pixel_perturbation,
                                pointing_hit, relevance_order, spearman, ssim, trapezoid_auc)
from handler.evaluation.randomisation import hog_similarity
from handler.evaluation.perturbation import curve_length

SIZE = 10
USED = [(1, 1), (2, 7), (3, 3), (4, 8), (5, 0), (6, 6), (7, 2), (8, 9), (9, 4), (0, 5)]  # 10 % of the pixels
WEIGHT = 0.5


class UsedPixels(nn.Module):
    """Two classes: logit_0 = 0, logit_1 = relu(w · Σ x over USED pixels and channels). Nothing else matters."""

    def __init__(self):
        super().__init__()
        mask = torch.zeros(SIZE, SIZE)
        for r, c in USED:
            mask[r, c] = 1.0
        self.register_buffer("mask", mask)

    def forward(self, x):
        s = F.relu(WEIGHT * (x * self.mask).sum(dim=(1, 2, 3)))
        return torch.stack([torch.zeros_like(s), s], dim=1)


def p1(used_pixels_left: int) -> float:
    """Class-1 probability with ``used_pixels_left`` USED pixels at 1 (one channel)."""
    return 1 / (1 + math.exp(-WEIGHT * used_pixels_left))


@pytest.fixture()
def toy():
    model = UsedPixels().eval()
    x = torch.ones(1, 1, SIZE, SIZE)
    exact = np.zeros((1, SIZE, SIZE), dtype=np.float32)
    for rank, (r, c) in enumerate(USED):
        exact[0, r, c] = 1.0 + rank  # the used pixels, all above every unused one
    return Explainer(model), model, x, exact


def test_a_map_ranking_the_used_pixels_gives_lerf_zero_and_large_morf(toy):
    explainer, _, x, exact = toy
    result = pixel_perturbation(explainer, x, exact, [1])
    assert result.probability[0] == pytest.approx(p1(10))
    assert result.lerf[0] == pytest.approx(np.zeros(10), abs=1e-12)  # only unused pixels removed
    # MoRF at k % removes the k most relevant used pixels: p' = sigmoid(w · (10 - k)).
    expected = [abs(p1(10) - p1(10 - k)) / p1(10) for k in range(1, 11)]
    assert result.morf[0] == pytest.approx(expected, rel=1e-4)
    assert result.morf[0, -1] == pytest.approx(1 - 0.5 / p1(10), rel=1e-5)


def test_the_reversed_map_swaps_lerf_and_morf(toy):
    explainer, _, x, exact = toy
    good = pixel_perturbation(explainer, x, exact, [1])
    inverted = exact.max() + 1 - exact
    inverted[exact == 0] = exact.max() + 2  # now the unused pixels are the most relevant
    worst = pixel_perturbation(explainer, x, inverted, [1])
    assert worst.morf[0] == pytest.approx(np.zeros(10), abs=1e-12)
    assert worst.lerf[0, -1] == pytest.approx(good.morf[0, -1])


def test_trapezoid_auc_of_known_curves():
    assert trapezoid_auc(np.ones(11)) == pytest.approx(1.0)
    assert trapezoid_auc(np.linspace(1, 0, 11)) == pytest.approx(0.5)
    assert trapezoid_auc(np.array([1.0, 0.0, 0.0, 0.0, 0.0])) == pytest.approx(0.125)
    assert trapezoid_auc(np.array([[0.0, 1.0], [1.0, 1.0]])) == pytest.approx([0.5, 1.0])
    with pytest.raises(ValueError):
        trapezoid_auc(np.ones(1))


def test_deletion_curve_of_an_exact_map_follows_the_used_pixels(toy):
    explainer, model, x, exact = toy
    result = insertion_deletion(explainer, x, exact, [1], step=5)
    points = curve_length(SIZE, SIZE, 5)
    assert result.deletion.shape == (1, points) == (1, 21)
    # Most relevant first: 5 used pixels per step, then nothing that matters is left.
    assert result.deletion[0, :3] == pytest.approx([p1(10), p1(5), p1(0)])
    assert result.deletion[0, 3:] == pytest.approx(np.full(points - 3, 0.5))
    assert result.deletion_auc[0] == pytest.approx(trapezoid_auc(result.deletion[0]))
    # Insertion starts from the blurred image and ends at the image itself.
    with torch.no_grad():
        start = model(blurred(x)).softmax(1)[0, 1].item()
    assert result.insertion[0, 0] == pytest.approx(start)
    assert result.insertion[0, -1] == pytest.approx(p1(10))
    assert result.insertion[0, 2] == pytest.approx(p1(10))  # every used pixel is back after two steps


def test_blur_is_rise_s_11x11_sigma5_gaussian():
    x = torch.zeros(1, 1, 31, 31)
    x[0, 0, 15, 15] = 1.0
    kernel = blurred(x)[0, 0]
    g = torch.exp(-torch.arange(-5, 6, dtype=torch.float64) ** 2 / (2 * 25.0))
    g = g / g.sum()
    assert kernel[10:21, 10:21].double() == pytest.approx(torch.outer(g, g), abs=1e-6)
    assert kernel.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_ties_are_broken_randomly_not_in_raster_order():
    flat = np.zeros((8, 8))
    order = relevance_order(flat, seed=3)
    assert sorted(order.tolist()) == list(range(64))
    assert order.tolist() != list(range(64))
    assert relevance_order(flat, seed=3).tolist() == order.tolist()  # reproducible
    ranked = np.arange(64.0).reshape(8, 8)
    assert relevance_order(ranked).tolist() == list(range(64))  # no ties: plain ascending


def test_spearman_ssim_and_hog_of_identical_and_opposite_maps():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(32, 32))
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(np.abs(a), np.abs(-a)) == pytest.approx(1.0)
    assert spearman(a, a * 3 + 1) == pytest.approx(1.0)  # ranks only
    assert abs(spearman(a, rng.normal(size=(32, 32)))) < 0.1
    assert math.isnan(spearman(np.zeros((4, 4)), a[:4, :4]))  # a constant map has no ranking
    assert ssim(a, a) == pytest.approx(1.0)
    assert ssim(a, rng.normal(size=(32, 32))) < 0.3
    assert hog_similarity(a, a) == pytest.approx(1.0)


def test_pointing_game_hit_miss_and_tolerance():
    box = Box(10, 20, 20, 30)  # columns 10..19, rows 20..29
    m = np.zeros((64, 64))
    m[25, 15] = 1.0
    assert pointing_hit(m, box, tolerance=0) == 1.0
    m = np.zeros((64, 64))
    m[25, 25] = 1.0  # 6 columns right of the last box column (19)
    assert pointing_hit(m, box, tolerance=5) == 0.0
    assert pointing_hit(m, box, tolerance=6) == 1.0
    m = np.zeros((64, 64))
    m[33, 23] = -1.0  # the map's magnitude counts; 4 rows and 4 columns off the corner: distance 5.66
    assert pointing_hit(np.abs(m), box, tolerance=5.6) == 0.0
    assert pointing_hit(np.abs(m), box, tolerance=5.7) == 1.0


def test_a_flat_map_scores_the_chance_of_a_random_point():
    box = Box(0, 0, 8, 4)
    flat = np.zeros((16, 16))
    assert pointing_hit(flat, box, tolerance=0) == pytest.approx(32 / 256)
    assert energy_in_box(flat, box) == pytest.approx(32 / 256)


def test_energy_inside_the_box():
    box = Box(2, 2, 6, 6)
    m = np.zeros((10, 10))
    m[3, 3], m[8, 8] = 3.0, -1.0
    assert energy_in_box(m, box) == pytest.approx(0.75)
    assert energy_in_box(np.ones((10, 10)), box) == pytest.approx(16 / 100)
    result = localisation(np.stack([m, np.ones((10, 10))]), [box, box], tolerance=0)
    assert result.hits.tolist() == [1.0, pytest.approx(16 / 100)]
    assert result.summary()["pointing_accuracy"] == pytest.approx((1 + 0.16) / 2)
