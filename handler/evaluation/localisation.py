"""Localisation against ground-truth boxes: the pointing game (Zhang et al. 2016) and energy inside the box.

Both read ``|attribution|``. A map whose maximum is shared by several pixels
(an all-zero map, a saturated one) scores the share of those pixels that hit:
the expected hit rate if the tie were broken at random, so a map that says
nothing scores chance, not a lucky first pixel in raster order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

@dataclass(frozen=True)
class Box:
    """A pixel rectangle ``x0 <= x < x1, y0 <= y < y1`` (columns x, rows y)."""

    x0: int
    y0: int
    x1: int
    y1: int

    @property
    def area(self) -> int:
        return (self.x1 - self.x0) * (self.y1 - self.y0)

    def to_list(self) -> list:
        return [self.x0, self.y0, self.x1, self.y1]


#: Zhang et al.'s tolerance, in pixels at ImageNet resolution (224); scale it with the image size.
POINTING_TOLERANCE_224 = 15.0


def tolerance_for(size: int) -> float:
    """The 15-pixel tolerance at 224 pixels, scaled to an image side of ``size`` pixels."""
    return POINTING_TOLERANCE_224 * size / 224.0


def distance_to_box(rows: np.ndarray, cols: np.ndarray, box: Box) -> np.ndarray:
    """Euclidean distance in pixels from pixel centres to the box (0 inside)."""
    dx = np.maximum(np.maximum(box.x0 - cols, 0), cols - (box.x1 - 1))
    dy = np.maximum(np.maximum(box.y0 - rows, 0), rows - (box.y1 - 1))
    return np.hypot(dx, dy)


def pointing_hit(relevance: np.ndarray, box: Box, tolerance: float = POINTING_TOLERANCE_224) -> float:
    """1 if the map's maximum lies within ``tolerance`` pixels of the box, 0 if not (ties: the share that hit)."""
    relevance = np.asarray(relevance)
    peak = relevance.max()
    rows, cols = np.nonzero(relevance == peak)
    return float(np.mean(distance_to_box(rows, cols, box) <= tolerance))


def energy_in_box(relevance: np.ndarray, box: Box) -> float:
    """Share of the map's total |relevance| inside the box; an all-zero map counts as uniform (the box's area share)."""
    relevance = np.abs(np.asarray(relevance, dtype=np.float64))
    total = relevance.sum()
    if total <= 0:
        return box.area / relevance.size
    return float(relevance[box.y0:box.y1, box.x0:box.x1].sum() / total)


@dataclass
class Localisation:
    tolerance: float
    hits: np.ndarray  # [B] in [0, 1]
    energy: np.ndarray  # [B]
    box_share: np.ndarray  # [B] box area / image area: what a uniform map's energy would be

    def summary(self) -> dict:
        return {
            "tolerance_px": self.tolerance,
            "pointing_accuracy": float(self.hits.mean()),
            "energy_in_box": float(self.energy.mean()),
            "box_area_share": float(self.box_share.mean()),
            "per_image": {"hit": self.hits.tolist(), "energy_in_box": self.energy.tolist()},
        }


def localisation(relevance: np.ndarray, boxes: Sequence[Box], tolerance: float) -> Localisation:
    """Pointing game and energy inside the box for maps ``[B, H, W]`` and one box per map."""
    if len(boxes) != len(relevance):
        raise ValueError(f"{len(boxes)} boxes for {len(relevance)} maps")
    pixels = relevance.shape[1] * relevance.shape[2]
    return Localisation(
        tolerance=float(tolerance),
        hits=np.array([pointing_hit(r, b, tolerance) for r, b in zip(relevance, boxes)]),
        energy=np.array([energy_in_box(r, b) for r, b in zip(relevance, boxes)]),
        box_share=np.array([b.area / pixels for b in boxes]),
    )
