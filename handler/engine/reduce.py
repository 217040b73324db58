"""Channel reductions: a ``[B, C, H, W]`` attribution becomes one value per pixel ``[B, H, W]``."""

from __future__ import annotations

import torch

from .registry import Registry

REDUCTIONS: Registry = Registry("channel reduction", "unknown_reduction")


@REDUCTIONS.register("max_abs")
def max_abs(maps: torch.Tensor) -> torch.Tensor:
    """Per pixel, the signed channel value of largest magnitude (the authors' evaluation); ties: the first channel.

    A running comparison over the (few) channels: the same values as
    ``gather(argmax(|maps|))``, which is several times slower on the CPU for ``C = 3``
    (benchmarks/speed/README.md, "Figures the code relies on").
    """
    best = maps[:, 0]
    best_abs = best.abs()
    for c in range(1, maps.shape[1]):
        value = maps[:, c]
        magnitude = value.abs()
        larger = magnitude > best_abs  # strictly: on a tie the earlier channel stays, as argmax does
        best = torch.where(larger, value, best)
        best_abs = torch.where(larger, magnitude, best_abs)
    return best


@REDUCTIONS.register("abs_sum")
def abs_sum(maps: torch.Tensor) -> torch.Tensor:
    """Per pixel, the sum of absolute channel values."""
    return maps.abs().sum(dim=1)


@REDUCTIONS.register("l2")
def l2(maps: torch.Tensor) -> torch.Tensor:
    """Per pixel, the Euclidean norm over channels."""
    return maps.pow(2).sum(dim=1).sqrt()


#: Below this max |value| a map is reported as all zero rather than blown up by normalisation.
ZERO_MAP_EPS = 1e-12


def normalise(maps: torch.Tensor) -> tuple:
    """Divide each map by its max |value|; returns (maps in [-1, 1], the per-sample scale)."""
    scale = maps.flatten(1).abs().amax(dim=1)
    safe = torch.where(scale > ZERO_MAP_EPS, scale, torch.ones_like(scale))
    out = torch.where((scale > ZERO_MAP_EPS)[:, None, None], maps / safe[:, None, None], torch.zeros_like(maps))
    return out, scale
