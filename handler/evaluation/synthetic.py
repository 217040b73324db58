"""A localisation set with exact ground truth: handwritten digits placed on natural textures.

Each image is a crop of a scikit-image texture (brick, grass, gravel, ...),
tinted with a random colour, with one of scikit-learn's 8×8 handwritten digits
upscaled and blended in at a random position, size and colour. The class is
the digit; the box is the tight bounding box of every pixel the digit changed,
so "inside the box" means exactly "on the digit". Nothing is downloaded: both
sources ship inside their PyPI packages.

Images are generated on demand from ``(seed, split, index)``, so any image of
any split is reproducible on its own and the training and test digits never
overlap (the 1797 digits are split once, by a fixed permutation).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .localisation import Box

#: Grayscale textures from ``skimage.data`` (512×512, shipped with the package).
TEXTURES = ("brick", "grass", "gravel", "moon")
#: Colour images from ``skimage.data`` used as textured backgrounds as well.
COLOUR_TEXTURES = ("hubble_deep_field", "immunohistochemistry")
SPLITS = ("train", "test")
TEST_DIGITS = 500  # of sklearn's 1797 digits, held out for the test split


@dataclass
class SyntheticImage:
    image: np.ndarray  # [H, W, 3] uint8
    label: int
    box: Box
    alpha: np.ndarray  # [H, W] float32 in [0, 1]: how much of each pixel is digit
    texture: str


@dataclass(frozen=True)
class SyntheticDigits:
    """The generator: ``dataset[i]`` is image ``i`` of ``split``; ``len`` is what was asked for."""

    split: str = "test"
    count: int = 500
    size: int = 112
    digit_size: tuple = (32, 56)  # side of the upscaled 8×8 digit, in pixels
    texture_contrast: tuple = (0.2, 0.6)  # range of the background's intensity spread
    seed: int = 0

    def __post_init__(self):
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {self.split!r}")
        if self.count < 1:
            raise ValueError("count must be at least 1")
        if not 0.0 <= self.texture_contrast[0] <= self.texture_contrast[1] <= 0.65:
            raise ValueError(f"texture_contrast must lie within [0, 0.65], got {self.texture_contrast}")
        if not 8 <= self.digit_size[0] <= self.digit_size[1] <= self.size:
            raise ValueError(f"digit_size must satisfy 8 <= min <= max <= size, got {self.digit_size}")

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[SyntheticImage]:
        for i in range(self.count):
            yield self[i]

    def __getitem__(self, index: int) -> SyntheticImage:
        if not 0 <= index < self.count:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, SPLITS.index(self.split), index])
        images, labels = _digits(self.split, self.seed)
        d = int(rng.integers(len(labels)))
        background, texture = _background(rng, self.size, self.texture_contrast)
        side = int(rng.integers(self.digit_size[0], self.digit_size[1] + 1))
        alpha = _upscale(images[d], side)
        ys, xs = np.nonzero(alpha > 0)
        # Place the drawn part of the digit fully inside the canvas.
        top = int(rng.integers(-ys.min(), self.size - ys.max()))
        left = int(rng.integers(-xs.min(), self.size - xs.max()))
        canvas_alpha = np.zeros((self.size, self.size), dtype=np.float32)
        ys, xs = ys + top, xs + left
        canvas_alpha[ys, xs] = alpha[ys - top, xs - left]
        colour = _stroke_colour(rng)
        image = background * (1 - canvas_alpha[..., None]) + colour[None, None, :] * canvas_alpha[..., None]
        box = Box(int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
        return SyntheticImage(
            image=np.clip(np.round(image * 255), 0, 255).astype(np.uint8),
            label=int(labels[d]), box=box, alpha=canvas_alpha, texture=texture)

    def batch(self, indices: Sequence[int], mean: Sequence[float], std: Sequence[float]) -> tuple:
        """Normalised ``[B, 3, H, W]`` tensors (as the model spec's preprocessing would make them), labels, boxes."""
        items = [self[i] for i in indices]
        x = torch.from_numpy(np.stack([it.image for it in items])).permute(0, 3, 1, 2).float() / 255.0
        x = (x - torch.tensor(mean)[None, :, None, None]) / torch.tensor(std)[None, :, None, None]
        return x, torch.tensor([it.label for it in items]), [it.box for it in items]


@functools.lru_cache(maxsize=None)
def _digits(split: str, seed: int) -> tuple:
    """The split's digit images (``[n, 8, 8]`` in [0, 1]) and labels; the test split is fixed per seed."""
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng([seed, 1797]).permutation(len(data.target))
    chosen = order[-TEST_DIGITS:] if split == "test" else order[:-TEST_DIGITS]
    return (data.images[chosen] / 16.0).astype(np.float32), data.target[chosen].copy()


@functools.lru_cache(maxsize=None)
def _textures() -> tuple:
    """Every available texture as ``(name, [H, W, 3] float32 in [0, 1])``."""
    import skimage.data

    out = []
    for name in TEXTURES + COLOUR_TEXTURES:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            continue
        try:
            image = np.asarray(loader(), dtype=np.float32) / 255.0
        except Exception:  # a loader that would need a download: skip it
            continue
        if image.ndim == 2:
            image = np.repeat(image[..., None], 3, axis=2)
        out.append((name, image[..., :3]))
    if not out:
        raise RuntimeError("no scikit-image textures are available (is scikit-image installed?)")
    return tuple(out)


def _background(rng: np.random.Generator, size: int, contrast_range: tuple) -> tuple:
    """A random crop of a random texture, flipped/rotated, its contrast and colour jittered."""
    textures = _textures()
    name, texture = textures[int(rng.integers(len(textures)))]
    scale = float(rng.uniform(0.5, 1.0))  # texture zoom: crop a larger window and shrink it
    window = min(int(size / scale), min(texture.shape[:2]))
    y = int(rng.integers(texture.shape[0] - window + 1))
    x = int(rng.integers(texture.shape[1] - window + 1))
    crop = torch.from_numpy(np.ascontiguousarray(texture[y:y + window, x:x + window])).permute(2, 0, 1)[None]
    crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    crop = crop[0].permute(1, 2, 0).numpy()
    crop = np.rot90(crop, int(rng.integers(4)))
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    gray = crop.mean(axis=2, keepdims=True)
    tint = rng.uniform(0.4, 1.0, size=3).astype(np.float32)
    saturation = float(rng.uniform(0.0, 1.0))
    crop = (gray + saturation * (crop - gray)) * tint
    lo, hi = np.percentile(crop, 1), np.percentile(crop, 99)
    contrast = float(rng.uniform(*contrast_range))
    offset = float(rng.uniform(0.0, 0.65 - contrast))  # backgrounds stay below 0.65; strokes are brighter
    crop = offset + contrast * (crop - lo) / max(hi - lo, 1e-6)
    return np.clip(crop, 0.0, 1.0).astype(np.float32), name


def _upscale(digit: np.ndarray, side: int) -> np.ndarray:
    """An 8×8 digit in [0, 1] as a ``side × side`` stroke opacity map (bicubic, clipped)."""
    t = torch.from_numpy(digit)[None, None]
    up = F.interpolate(t, size=(side, side), mode="bicubic", align_corners=False)[0, 0].numpy()
    up = np.clip(up, 0.0, 1.0)
    up[up < 0.05] = 0.0  # interpolation ripples are not strokes
    return up.astype(np.float32)


def _stroke_colour(rng: np.random.Generator) -> np.ndarray:
    """A bright colour of random hue: strokes are always brighter than the (darker) textures."""
    hue = rng.uniform(0.0, 1.0, size=3).astype(np.float32)
    hue = hue / max(float(hue.max()), 1e-6)
    brightness = float(rng.uniform(0.85, 1.0))
    return np.clip(brightness * (0.55 + 0.45 * hue), 0, 1).astype(np.float32)
