"""Pixel-perturbation protocols: LeRF/MoRF (Khakzar et al. 2021) and insertion/deletion AUC (RISE, Petsiuk 2018).

Both remove (or insert) whole pixels, every channel at once, in the order a
map ranks them by ``|attribution|``. Ties (an all-zero map, a pathway gradient
that is exactly zero on many pixels) are broken by a seeded random order, never
by raster order, which would reward maps that happen to be zero at the bottom.
The perturbed images of all steps go through the model in batches and are
generated lazily, so a 225-step curve never sits in memory whole.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from torchvision.transforms.v2 import functional as TF

from ..engine import Explainer
from .maps import target_probabilities
from .progress import Progress

#: The fractions of pixels LeRF/MoRF remove (the authors' 1 % ... 10 %).
FRACTIONS = tuple(round(0.01 * k, 2) for k in range(1, 11))
#: RISE's step for single images: pixels inserted or deleted per step.
RISE_STEP = 224
#: RISE's insertion start: the image blurred with an 11×11 Gaussian, sigma 5.
BLUR_KERNEL, BLUR_SIGMA = 11, 5.0


def relevance_order(relevance: np.ndarray, seed: int = 0) -> np.ndarray:
    """Flat pixel indices from least to most relevant; equal values in a seeded random order."""
    flat = np.asarray(relevance, dtype=np.float64).ravel()
    tiebreak = np.random.default_rng(seed).random(flat.size)
    return np.lexsort((tiebreak, flat))


def set_pixels(x: torch.Tensor, pixels: np.ndarray, source) -> torch.Tensor:
    """A copy of ``x`` ``[C, H, W]`` with ``pixels`` (flat indices) taken from ``source`` (a tensor or a number)."""
    out = x.clone()
    flat = out.view(out.shape[0], -1)
    index = torch.from_numpy(np.array(pixels, dtype=np.int64)).to(x.device)  # a copy: orders may be reversed views
    if isinstance(source, torch.Tensor):
        flat[:, index] = source.reshape(source.shape[0], -1)[:, index]
    else:
        flat[:, index] = float(source)
    return out


def pixel_count(fraction: float, pixels: int) -> int:
    return int(round(fraction * pixels))


@dataclass
class PixelPerturbation:
    """|p − p′| / p of the explained class after removing the least (LeRF) or most (MoRF) relevant pixels."""

    fractions: tuple
    probability: np.ndarray  # [B] p: the unperturbed probability of the target
    lerf: np.ndarray  # [B, F]
    morf: np.ndarray  # [B, F]

    def summary(self) -> dict:
        return {
            "fractions": list(self.fractions),
            "lerf": _mean_curve(self.lerf), "morf": _mean_curve(self.morf),
            "per_image": {"probability": self.probability.tolist(), "lerf": self.lerf.tolist(),
                          "morf": self.morf.tolist()},
        }


def pixel_perturbation(
    explainer: Explainer,
    x: torch.Tensor,
    relevance: np.ndarray,
    targets: Sequence[int],
    *,
    fractions: Sequence[float] = FRACTIONS,
    value: float = 0.0,
    batch_size: int = 32,
    seed: int = 0,
    progress: Optional[Progress] = None,
) -> PixelPerturbation:
    """LeRF and MoRF of maps ``relevance`` ``[B, H, W]`` for images ``x`` ``[B, C, H, W]`` (normalised).

    Removed pixels are set to ``value`` in normalised space (0: the dataset mean).
    """
    batch, _, height, width = x.shape
    _check_maps(x, relevance)
    counts = [pixel_count(f, height * width) for f in fractions]
    orders = [relevance_order(relevance[b], seed=_seed(seed, b)) for b in range(batch)]

    def images() -> Iterator[torch.Tensor]:
        for b in range(batch):
            yield x[b]
            for k in counts:
                yield set_pixels(x[b], orders[b][:k], value)  # least relevant first
            for k in counts:
                yield set_pixels(x[b], orders[b][::-1][:k], value)  # most relevant first

    per_image = 1 + 2 * len(counts)
    repeated = [int(t) for t in targets for _ in range(per_image)]
    probs = target_probabilities(explainer, images(), repeated, batch_size=batch_size,
                                 progress=progress).reshape(batch, per_image)
    p = probs[:, 0]
    change = np.abs(p[:, None] - probs[:, 1:]) / np.maximum(p[:, None], 1e-12)
    return PixelPerturbation(tuple(fractions), p, change[:, :len(counts)], change[:, len(counts):])


# ---------------------------------------------------------------------------
# Insertion / deletion
# ---------------------------------------------------------------------------


def blurred(x: torch.Tensor, kernel: int = BLUR_KERNEL, sigma: float = BLUR_SIGMA) -> torch.Tensor:
    """RISE's insertion start: a Gaussian blur of the (normalised) image, reflect-padded at the border."""
    return TF.gaussian_blur(x, [kernel, kernel], [sigma, sigma])


def trapezoid_auc(curve: np.ndarray) -> np.ndarray:
    """Area under curves sampled at equal steps over [0, 1] (RISE's normalisation): last axis is the curve."""
    curve = np.asarray(curve, dtype=np.float64)
    steps = curve.shape[-1] - 1
    if steps < 1:
        raise ValueError("a curve needs at least two points")
    return (curve.sum(axis=-1) - curve[..., 0] / 2 - curve[..., -1] / 2) / steps


@dataclass
class InsertionDeletion:
    """Class-probability curves while the most relevant pixels are deleted (→ 0) or inserted (blur → image)."""

    step: int
    fractions: np.ndarray  # [S + 1] share of pixels changed at each point
    deletion: np.ndarray  # [B, S + 1]
    insertion: np.ndarray  # [B, S + 1]

    @property
    def deletion_auc(self) -> np.ndarray:
        return trapezoid_auc(self.deletion)

    @property
    def insertion_auc(self) -> np.ndarray:
        return trapezoid_auc(self.insertion)

    def summary(self) -> dict:
        return {
            "step": self.step,
            "deletion_auc": _mean(self.deletion_auc), "insertion_auc": _mean(self.insertion_auc),
            "deletion_curve": self.deletion.mean(0).round(6).tolist(),
            "insertion_curve": self.insertion.mean(0).round(6).tolist(),
            "per_image": {"deletion_auc": self.deletion_auc.tolist(), "insertion_auc": self.insertion_auc.tolist()},
        }


def curve_images(start: torch.Tensor, end, order: np.ndarray, step: int) -> Iterator[torch.Tensor]:
    """``start``, then ``start`` with the first ``step``, ``2·step``, ... pixels of ``order`` taken from ``end``."""
    work = start.clone()
    flat = work.view(work.shape[0], -1)
    source = end.reshape(end.shape[0], -1) if isinstance(end, torch.Tensor) else None
    yield work.clone()
    for begin in range(0, order.size, step):
        index = torch.as_tensor(order[begin:begin + step], dtype=torch.long, device=work.device)
        flat[:, index] = source[:, index] if source is not None else float(end)
        yield work.clone()


def insertion_deletion(
    explainer: Explainer,
    x: torch.Tensor,
    relevance: np.ndarray,
    targets: Sequence[int],
    *,
    step: int = RISE_STEP,
    value: float = 0.0,
    batch_size: int = 32,
    seed: int = 0,
    progress: Optional[Progress] = None,
) -> InsertionDeletion:
    """Deletion and insertion curves (RISE) for maps ``relevance`` ``[B, H, W]``, most relevant pixels first."""
    batch, _, height, width = x.shape
    _check_maps(x, relevance)
    if step < 1:
        raise ValueError("step must be at least 1 pixel")
    pixels = height * width
    points = -(-pixels // step) + 1
    orders = [relevance_order(relevance[b], seed=_seed(seed, b))[::-1].copy() for b in range(batch)]
    start = blurred(x)

    def images() -> Iterator[torch.Tensor]:
        for b in range(batch):
            yield from curve_images(x[b], value, orders[b], step)
            yield from curve_images(start[b], x[b], orders[b], step)

    repeated = [int(t) for t in targets for _ in range(2 * points)]
    probs = target_probabilities(explainer, images(), repeated, batch_size=batch_size,
                                 progress=progress).reshape(batch, 2, points)
    fractions = np.minimum(np.arange(points) * step, pixels) / pixels
    return InsertionDeletion(step, fractions, probs[:, 0], probs[:, 1])


def curve_length(height: int, width: int, step: int = RISE_STEP) -> int:
    """Points on one insertion or deletion curve (including the start)."""
    return -(-(height * width) // step) + 1


# ---------------------------------------------------------------------------


def _check_maps(x: torch.Tensor, relevance: np.ndarray) -> None:
    if relevance.shape != (x.shape[0], x.shape[2], x.shape[3]):
        raise ValueError(f"maps {tuple(relevance.shape)} do not match images {tuple(x.shape)}")


def _seed(seed: int, index: int) -> list:
    return [int(seed), int(index)]


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values))


def _mean_curve(values: np.ndarray) -> list:
    return [float(v) for v in values.mean(axis=0)]
