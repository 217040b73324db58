"""Sanity check by cascading randomisation (Adebayo et al. 2018).

The model's units are re-initialised one at a time from the logits down,
cumulatively; after each, every method explains the same images for the same
classes again and its maps are compared with the original ones. A method whose
maps depend on what the network learned drifts away from them (rank
correlation towards 0); one that mostly reflects the input or the architecture
does not.

Units are found generically: the model's top-level children, with containers
(``nn.Sequential``/``ModuleList``/``ModuleDict``, e.g. timm's ``blocks``, a
ResNet's ``layer1``) opened one level; a unit that only normalises (a
BatchNorm after ``conv_stem``) joins the unit that runs before it. Order is the
order in which they run on the actual input, not the order they were declared.
Re-initialisation is each layer's own ``reset_parameters()`` (what a fresh
layer gets), seeded per stage.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..engine import Explainer, explaining
from .maps import Maps, explain_maps
from .progress import Progress

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_NORMALISATION = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


@dataclass(frozen=True)
class Stage:
    """One step of the cascade: the modules (qualified names) re-initialised at it."""

    modules: tuple

    @property
    def name(self) -> str:
        return "+".join(self.modules)


def _has_parameters(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def _only_normalisation(module: nn.Module) -> bool:
    owners = [m for m in module.modules() if any(True for _ in m.parameters(recurse=False))]
    return bool(owners) and all(isinstance(m, _NORMALISATION) for m in owners)


def _units(model: nn.Module) -> list:
    units = [(name, child) for name, child in model.named_children()]
    while len([u for u in units if _has_parameters(u[1])]) == 1:  # a wrapper: look inside it
        name, only = next(u for u in units if _has_parameters(u[1]))
        inner = [(f"{name}.{n}", c) for n, c in only.named_children()]
        if not inner:
            break
        units = inner
    out = []
    for name, child in units:
        if isinstance(child, _CONTAINERS):
            out.extend((f"{name}.{n}", c) for n, c in child.named_children())
        else:
            out.append((name, child))
    return [(n, m) for n, m in out if _has_parameters(m)]


def cascade_stages(model: nn.Module, x: torch.Tensor) -> list:
    """The cascade's stages for ``model``, from the logits down (the order they are randomised in)."""
    units = _units(model)
    order: dict = {}

    def first_call(name):
        def hook(_module, _args) -> None:  # a pre-hook that returns something replaces the input
            order.setdefault(name, len(order))
        return hook

    handles = [m.register_forward_pre_hook(first_call(n)) for n, m in units]
    try:
        with explaining(model), torch.no_grad():
            model(x[:1])
    finally:
        for h in handles:
            h.remove()
    modules = dict(units)
    groups: list = []
    for name in sorted(order, key=order.get):
        if groups and _only_normalisation(modules[name]):
            groups[-1].append(name)
        else:
            groups.append([name])
    return [Stage(tuple(group)) for group in reversed(groups)]


def reinitialise(module: nn.Module, seed: int) -> None:
    """Every layer inside ``module`` back to a fresh layer's parameters (``reset_parameters``), reproducibly."""
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        for layer in module.modules():
            reset = getattr(layer, "reset_parameters", None)
            if callable(reset):
                reset()


# ---------------------------------------------------------------------------
# Map similarity
# ---------------------------------------------------------------------------


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two maps (average ranks for ties); NaN when either map is constant."""
    from scipy.stats import rankdata

    ra, rb = rankdata(np.ravel(a)), rankdata(np.ravel(b))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denominator) if denominator > 0 else float("nan")


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity of two |maps| scaled to [0, 1] each."""
    from skimage.metrics import structural_similarity

    return float(structural_similarity(_unit(a), _unit(b), data_range=1.0))


def hog_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of the HOG features of two |maps| (Adebayo et al.); NaN when either is flat."""
    from skimage.feature import hog

    cell = max(4, min(a.shape) // 28)
    fa = hog(_unit(a), pixels_per_cell=(cell, cell), cells_per_block=(2, 2))
    fb = hog(_unit(b), pixels_per_cell=(cell, cell), cells_per_block=(2, 2))
    fa, fb = fa - fa.mean(), fb - fb.mean()
    denominator = np.sqrt((fa * fa).sum() * (fb * fb).sum())
    return float((fa * fb).sum() / denominator) if denominator > 0 else float("nan")


def _unit(a: np.ndarray) -> np.ndarray:
    a = np.abs(np.asarray(a, dtype=np.float64))
    top = a.max()
    return a / top if top > 0 else a


#: name -> similarity of an original and a randomised map (signed maps in, each metric decides on |·|).
SIMILARITIES: dict = {
    "spearman_abs": lambda a, b: spearman(np.abs(a), np.abs(b)),
    "spearman": spearman,
    "ssim": ssim,
    "hog": hog_similarity,
}


@dataclass
class Cascade:
    """Similarity of each stage's maps to the original maps: ``metrics[name]`` is ``[stages, images]``."""

    stages: list
    metrics: dict
    seconds: float = 0.0

    def summary(self) -> dict:
        out = {"stages": list(self.stages), "seconds": round(self.seconds, 2)}
        for name, values in self.metrics.items():
            out[name] = {"mean": [_nanmean(row) for row in values],
                         "undefined": [int(np.isnan(row).sum()) for row in values],
                         "per_image": [[None if np.isnan(v) else float(v) for v in row] for row in values]}
        return out


def _nanmean(row: np.ndarray) -> Optional[float]:
    row = row[~np.isnan(row)]
    return float(row.mean()) if row.size else None


def compare_maps(original: np.ndarray, randomised: np.ndarray, similarities: dict = SIMILARITIES) -> dict:
    """Per metric, one similarity per image of two ``[B, H, W]`` stacks."""
    return {name: np.array([fn(a, b) for a, b in zip(original, randomised)]) for name, fn in similarities.items()}


def cascading_randomisation(
    model: nn.Module,
    x: torch.Tensor,
    originals: Sequence[Maps],
    *,
    make_explainer: Callable[[nn.Module], Explainer],
    stages: Optional[Sequence[Stage]] = None,
    sparsity: Optional[float] = None,
    reduce: Optional[str] = None,
    batch_size: int = 16,
    seed: int = 0,
    similarities: dict = SIMILARITIES,
    progress: Optional[Progress] = None,
) -> dict:
    """Per method variant (the ``originals``' variants), a :class:`Cascade` over ``stages`` (default: all).

    Each variant explains, after each stage, the same classes its original maps
    explained. ``model`` itself is never changed: the cascade runs on a copy.
    """
    import time

    stages = list(stages) if stages is not None else cascade_stages(model, x)
    randomised = copy.deepcopy(model)
    collected = {o.variant.label: {name: [] for name in similarities} for o in originals}
    seconds = {o.variant.label: 0.0 for o in originals}
    for index, stage in enumerate(stages):
        for name in stage.modules:
            reinitialise(randomised.get_submodule(name), seed * 1000 + index)
        explainer = make_explainer(randomised)
        for original in originals:
            started = time.perf_counter()
            maps = explain_maps(explainer, x, original.variant, targets=original.targets, sparsity=sparsity,
                                reduce=reduce, batch_size=batch_size)
            scores = compare_maps(original.attribution, maps.attribution, similarities)
            for name, values in scores.items():
                collected[original.variant.label][name].append(values)
            seconds[original.variant.label] += time.perf_counter() - started
            if progress is not None:
                progress.advance(1)
    return {
        label: Cascade([s.name for s in stages], {k: np.stack(v) for k, v in metrics.items()}, seconds[label])
        for label, metrics in collected.items()
    }
