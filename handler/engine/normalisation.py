"""How a model's input was made from pixels: what "black" or "the pixel range" means in normalised space.

The engine works on normalised batches, ``(pixel - mean) / std`` per channel.
A few methods need to know what an input *looks like* (integrated gradients'
black baseline is the image that is black in pixel space, not the all-zero
tensor); they are registered with ``uses_normalisation=True`` and the
:class:`~handler.engine.Explainer` hands them the model's normalisation (the
service takes it from the model spec's preprocessing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

#: The statistics torchvision's and timm's ImageNet models are trained with, and the model spec's default.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputNormalisation:
    """Per-channel ``mean`` and ``std`` such that the model's input is ``(pixel - mean) / std``, pixels in [0, 1]."""

    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def __post_init__(self):
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if len(self.mean) != len(self.std) or not self.mean:
            raise ValueError(f"normalisation needs one mean and one std per channel, got {self.mean} and {self.std}")
        if any(not s > 0 for s in self.std):
            raise ValueError(f"normalisation std must be positive, got {self.std}")

    def _per_channel(self, values: tuple, like: torch.Tensor) -> torch.Tensor:
        if like.dim() < 2 or like.shape[1] != len(values):
            raise ValueError(f"the normalisation has {len(values)} channels, the input {tuple(like.shape)} has "
                             f"{like.shape[1] if like.dim() >= 2 else 'none'}")
        shape = (1, len(values)) + (1,) * (like.dim() - 2)
        return torch.tensor(values, dtype=like.dtype, device=like.device).view(shape)

    def from_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [0, 1] ``[B, C, ...]`` as the model's input."""
        return (pixels - self._per_channel(self.mean, pixels)) / self._per_channel(self.std, pixels)

    def to_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """The model's input ``[B, C, ...]`` back in pixel units."""
        return x * self._per_channel(self.std, x) + self._per_channel(self.mean, x)

    def black(self, like: torch.Tensor) -> torch.Tensor:
        """The normalised input of an all-black image, shaped like ``like``: ``-mean / std`` per channel."""
        return self.from_pixels(torch.zeros_like(like))
