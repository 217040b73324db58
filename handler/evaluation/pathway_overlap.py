"""How pathways from different selection strategies relate: dead neurons kept, overlap, response kept.

Khakzar et al. (2021, §3) argue that pathways learned with a pruning objective
keep the network's response without containing the critical features: with
random gate initialisation 67 % of their kept neurons were *dead* (zero) in the
original network, against 0 % for contribution-based selection, and the two
pathways overlapped by a Jaccard index of 2-30 %. This module measures the same
quantities for any registered selection strategies. Which neurons are alive is
measured here, with one instrumented forward, not taken from the strategies.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..engine import SELECTIONS, instrument, run_along
from ..engine.explainer import explaining
from ..engine.sites import SiteCall
from .progress import Progress


def alive_neurons(model: nn.Module, x: torch.Tensor) -> tuple:
    """``(layout, alive [B, N] bool)``: which neurons are non-zero in the full network at ``x``."""
    parts: list = []

    def record(call: SiteCall) -> torch.Tensor:
        out = call.run()
        parts.append((out != 0).flatten(1))
        return out

    with explaining(model), torch.no_grad(), instrument(model, record, inputs=x) as recorder:
        model(x)
    return recorder.layout, torch.cat(parts, dim=1)


def jaccard(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per row, |A ∩ B| / |A ∪ B| of two ``[B, N]`` boolean masks (1 when both are empty)."""
    inter = (a & b).sum(1, dtype=torch.float64)
    union = (a | b).sum(1, dtype=torch.float64)
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def chance_jaccard(kept_a: np.ndarray, kept_b: np.ndarray) -> np.ndarray:
    """Expected Jaccard index of two independent random subsets keeping these fractions of the neurons."""
    both = kept_a * kept_b
    return both / np.maximum(kept_a + kept_b - both, 1e-12)


@dataclass
class SelectionStats:
    """Per image: share of kept neurons that are dead, overlap with the reference pathway, response kept."""

    selection: str
    options: dict
    kept_fraction: np.ndarray  # [B] 1 - realised sparsity
    kept_dead_share: np.ndarray  # [B] |kept ∩ dead| / |kept|
    jaccard_with_reference: np.ndarray  # [B]
    chance_jaccard: np.ndarray  # [B] independent random subsets of the same sizes
    probability: np.ndarray  # [B] full network, target class
    pathway_probability: np.ndarray  # [B] along the pathway, target class
    seconds: float

    @property
    def label(self) -> str:
        return self.selection + ("" if not self.options else
                                 ":" + ",".join(f"{k}={_show(v)}" for k, v in sorted(self.options.items())))

    def summary(self) -> dict:
        per_image = {
            "kept_fraction": self.kept_fraction.tolist(), "kept_dead_share": self.kept_dead_share.tolist(),
            "jaccard_with_reference": self.jaccard_with_reference.tolist(),
            "probability": self.probability.tolist(), "pathway_probability": self.pathway_probability.tolist(),
        }
        return {
            "label": self.label, "selection": self.selection, "options": self.options,
            "kept_fraction": float(self.kept_fraction.mean()),
            "kept_dead_share": float(self.kept_dead_share.mean()),
            "jaccard_with_reference": float(self.jaccard_with_reference.mean()),
            "chance_jaccard": float(self.chance_jaccard.mean()),
            "probability": float(self.probability.mean()),
            "pathway_probability": float(self.pathway_probability.mean()),
            "seconds_per_image": self.seconds / len(self.kept_fraction),
            "per_image": per_image,
        }


def _show(value) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


@dataclass
class PathwayOverlap:
    reference: str
    sparsity: float
    dead_share: np.ndarray  # [B] share of all neurons that are dead in the full network
    selections: list  # SelectionStats, the reference first

    def summary(self) -> dict:
        return {"reference": self.reference, "sparsity": self.sparsity,
                "dead_share_of_network": float(self.dead_share.mean()),
                "selections": [s.summary() for s in self.selections]}


def compare_selections(
    model: nn.Module,
    x: torch.Tensor,
    targets: Sequence[int],
    selections: Sequence[tuple],
    *,
    sparsity: float,
    batch_size: int = 8,
    progress: Optional[Progress] = None,
) -> PathwayOverlap:
    """Pathways of each ``(name, options)`` selection at ``sparsity``; the first one is the reference.

    ``targets`` are the explained classes (resolved indices, one per image).
    """
    if not selections:
        raise ValueError("no selection strategies to compare")
    stats = {i: {"keep": [], "dead": [], "jaccard": [], "prob": [], "path_prob": [], "seconds": 0.0}
             for i in range(len(selections))}
    dead_share = []
    for start in range(0, x.shape[0], batch_size):
        xs = x[start:start + batch_size]
        ts = torch.as_tensor([int(t) for t in targets[start:start + batch_size]], device=xs.device)
        layout, alive = alive_neurons(model, xs)
        dead_share.append((~alive).double().mean(1))
        reference_keep = None
        for i, (name, options) in enumerate(selections):
            started = time.perf_counter()
            with explaining(model):
                pathway = SELECTIONS.get(name)(model, xs, ts, [sparsity] * len(xs), **dict(options))
                with torch.no_grad():
                    path_logits = run_along(model, xs, pathway)
            stats[i]["seconds"] += time.perf_counter() - started
            if pathway.layout.sites != layout.sites:
                raise RuntimeError(f"selection {name!r} produced a pathway over different sites")
            keep = pathway.keep
            if reference_keep is None:
                reference_keep = keep
            kept = keep.sum(1, dtype=torch.float64)
            s = stats[i]
            s["keep"].append(kept / layout.total)
            s["dead"].append((keep & ~alive).sum(1, dtype=torch.float64) / kept.clamp(min=1))
            s["jaccard"].append(jaccard(keep, reference_keep))
            s["prob"].append(pathway.logits.float().softmax(1).gather(1, ts[:, None]).squeeze(1).double())
            s["path_prob"].append(path_logits.float().softmax(1).gather(1, ts[:, None]).squeeze(1).double())
            if progress is not None:
                progress.advance(len(xs))
    joined = {i: {k: torch.cat(v).cpu().numpy() if isinstance(v, list) else v for k, v in s.items()}
              for i, s in stats.items()}
    reference_kept = joined[0]["keep"]
    results = [
        SelectionStats(
            selection=name, options=dict(options), kept_fraction=joined[i]["keep"],
            kept_dead_share=joined[i]["dead"], jaccard_with_reference=joined[i]["jaccard"],
            chance_jaccard=chance_jaccard(joined[i]["keep"], reference_kept),
            probability=joined[i]["prob"], pathway_probability=joined[i]["path_prob"],
            seconds=joined[i]["seconds"])
        for i, (name, options) in enumerate(selections)
    ]
    return PathwayOverlap(selections[0][0], float(sparsity), torch.cat(dead_share).cpu().numpy(), results)
