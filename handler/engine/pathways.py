"""Pathways: per-sample binary masks over all neurons, how a network runs along one, and the registry of the
strategies that select them.

A selection strategy (registered in :data:`SELECTIONS`) scores every neuron of
every activation site for one input and target and keeps those above a
per-sample threshold (:mod:`.threshold`); the paper's strategy lives in
:mod:`.contribution`, the others in :mod:`.selections`. :func:`run_along`
runs the network with every site's output multiplied by the pathway's mask.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .options import OptionSpec
from .registry import Registry
from .sites import SiteCall, SiteLayout, instrument


@dataclass
class Pathway:
    """The kept neurons of a batch, and what the selection pass learned on the way."""

    selection: str
    layout: SiteLayout
    keep: torch.Tensor  # [B, N] bool
    requested_sparsity: Sequence[float]
    targets: torch.Tensor  # [B] long: the class each sample's pathway was selected for
    logits: torch.Tensor  # [B, K] logits of the full network at the input
    channel_scores: Optional[list] = None  # per site [B, C]: each channel's summed neuron score
    alive: Optional[torch.Tensor] = None  # [B, N] bool: neuron non-zero in the full network
    details: list = field(default_factory=list)  # per sample: strategy-specific facts
    #: The selection cannot keep a dead neuron (it scores 0 and the threshold removes every score <= τ, τ >= 0),
    #: so ``alive`` need not be recorded to report ``kept_dead_neurons`` = 0.
    keeps_no_dead: bool = False

    @property
    def batch_size(self) -> int:
        return self.keep.shape[0]

    def realised_sparsity(self) -> torch.Tensor:
        return 1.0 - self.kept_per_site().sum(dim=1).double() / self.layout.total

    def kept_per_site(self) -> torch.Tensor:
        """``[B, sites]`` kept neurons of each site.

        On the CPU NumPy's ``count_nonzero`` on each contiguous row slice (torch's on strided
        ``[B, n]`` views, or a bool ``sum``, is an order of magnitude slower there: benchmarks/speed/README.md,
        "Figures the code relies on"); on a device ``count_nonzero``.
        """
        if self.keep.device.type == "cpu":
            keep = self.keep.numpy()
            return torch.tensor([[np.count_nonzero(keep[b, s.offset:s.offset + s.numel]) for s in self.layout]
                                 for b in range(self.batch_size)], dtype=torch.int64)
        return torch.stack([torch.count_nonzero(site.view(self.keep).flatten(1), dim=1) for site in self.layout], 1)

    def summaries(self, top_channels: int = 3) -> list:
        """One JSON-ready summary per sample; everything computed on the device, then one transfer per quantity."""
        kept_per_site = self.kept_per_site().cpu().tolist()
        dead_kept = None
        if self.alive is not None:
            dead_kept = torch.count_nonzero(self.keep & ~self.alive, dim=1).cpu().tolist()
        elif self.keeps_no_dead:
            dead_kept = [0] * self.batch_size
        channels = None
        if self.channel_scores is not None:
            picked = [scores.topk(min(top_channels, scores.shape[1]), dim=1).indices for scores in self.channel_scores]
            flat = torch.cat(picked, dim=1).cpu().tolist()
            widths = [p.shape[1] for p in picked]
            channels = []
            for row in flat:
                split, start = [], 0
                for w in widths:
                    split.append(row[start:start + w])
                    start += w
                channels.append(split)
        out = []
        for b in range(self.batch_size):
            kept_total = int(sum(kept_per_site[b]))
            sites, removed = [], []
            selectable = iter(enumerate(self.layout))
            for site in self.layout.sites:
                entry = {"name": site.name, "kind": site.kind, "call": site.batch, "shape": list(site.shape)}
                if not site.selectable:  # a table shared by the batch: not part of any pathway, always kept
                    entry.update(kept=0, total=0, selectable=False)
                    sites.append(entry)
                    continue
                i, _ = next(selectable)
                entry.update(kept=int(kept_per_site[b][i]), total=site.numel)
                if entry["kept"] == 0:
                    removed.append(site.name)
                if channels is not None:
                    entry["top_channels"] = channels[b][i]
                sites.append(entry)
            summary = {
                "selection": self.selection,
                "requested_sparsity": float(self.requested_sparsity[b]),
                "realised_sparsity": 1.0 - kept_total / self.layout.total,
                "kept_neurons": kept_total,
                "total_neurons": self.layout.total,
                "locally_linear": self.layout.locally_linear,
                "nonlinear_activations": self.layout.nonlinear_kinds,
            }
            if dead_kept is not None:
                summary["kept_dead_neurons"] = int(dead_kept[b])
            if self.details:
                summary.update(self.details[b])
            summary["removed_sites"] = removed  # sites of which the pathway keeps no neuron: every path through them is cut
            summary["sites"] = sites
            out.append(summary)
        return out


def pathway_notes(summary: dict) -> list:
    """What a reader of one sample's pathway summary should know about it (for the response's ``notes``)."""
    if summary["locally_linear"]:
        return []
    return ["the model has non-piecewise-linear activations (" + ", ".join(summary["nonlinear_activations"])
            + "): the pathway is masked as usual, but it is not exactly linear around the input"]


def pathway_zero_note(summary: dict) -> str:
    """Why a pathway method's map is zero: the target ignores the input, or the threshold cut every path
    (naming the sites it removed entirely), or the kept paths cancel."""
    if summary["kept_neurons"] == 0:
        return ("the attribution is zero: the target logit does not depend on the input (no neuron contributes "
                "to it, e.g. a zero-initialised classifier head), so the pathway keeps no neuron")
    if summary.get("removed_sites"):
        names = summary["removed_sites"]
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        return (f"the attribution is zero: the threshold removed every neuron of {len(names)} site(s) ({shown}), "
                "cutting every path between the input and the target; a lower sparsity keeps them")
    return ("the attribution is zero: the target logit does not depend on the input along this pathway "
            "(the kept neurons' paths to the input cancel or are cut by masked neurons)")


def resolve_targets(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each sample's target class: the given index, or the predicted class where it is negative."""
    return torch.where(targets < 0, logits.argmax(dim=1), targets)


def target_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ_b logit[b, c_b]: one backward gives every sample's gradient (samples are independent in eval mode)."""
    return logits.gather(1, targets[:, None]).sum()


def channel_sums(layout: SiteLayout, scores: torch.Tensor) -> list:
    """Per site, each channel's summed score ``[B, C]`` (channels: dim 1 of images, last dim of tokens)."""
    return [site_channel_sums(site.view(scores)) for site in layout]


def site_channel_sums(view: torch.Tensor) -> torch.Tensor:
    """One site's ``[B, ...]`` scores summed per channel: ``[B, C]``."""
    if view.dim() == 4:
        return view.sum(dim=(2, 3))
    if view.dim() == 3:
        return view.sum(dim=1)
    return view.flatten(1).clone()


#: Activation kinds whose output *and* autograd derivative are zero where their input is zero (ReLU and
#: ReLU6 compute their backward from the output: ``grad * (0 < out < max)``). Zeroing a removed neuron's input
#: before such an activation removes it from the forward and the backward alike, with no mask in the graph.
ZERO_GRADIENT_AT_ZERO = frozenset({"relu", "relu6"})


def run_along(model: nn.Module, x: torch.Tensor, pathway: Pathway) -> torch.Tensor:
    """Forward ``x`` through ``model`` with every site's output multiplied by the pathway's fixed mask.

    Where the model called a ReLU or ReLU6 in place, the removed neurons' inputs
    are zeroed in place outside autograd and the activation runs as the model
    asked: the activation's own backward then gives them zero gradient, so the
    pass costs one multiplication per site and the backward nothing extra.
    Elsewhere the output is multiplied by the mask inside autograd.
    """
    if x.shape[0] != pathway.batch_size:
        raise ValueError(f"input batch {x.shape[0]} does not match the pathway's batch {pathway.batch_size}")
    keep = pathway.keep

    def mask(call: SiteCall) -> torch.Tensor:
        # as uint8: multiplying a float by a bool tensor goes through a float copy of the mask (slower on the CPU)
        kept = call.site.view(keep).view(torch.uint8)
        if call.may_modify_input and call.site.kind in ZERO_GRADIENT_AT_ZERO:
            with torch.no_grad():
                call.input.mul_(kept)
            return call.run()
        return call.run() * kept

    with instrument(model, mask, expected=pathway.layout, inputs=x):
        return model(x)


# ---------------------------------------------------------------------------
# Selection strategies
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Selection:
    """A strategy: ``fn(model, x, targets, sparsity, **options) -> Pathway``; ``targets`` holds ``-1``
    where the predicted class is meant, ``sparsity`` one value per sample."""

    name: str
    fn: Callable[..., Pathway]
    summary: str
    options: Mapping[str, OptionSpec] = field(default_factory=dict)

    def __call__(self, model, x, targets, sparsity, **options) -> Pathway:
        return self.fn(model, x, targets, sparsity, **options)


SELECTIONS: Registry = Registry("pathway selection", "unknown_selection")


def register_selection(name: str, *, options: Optional[Mapping[str, OptionSpec]] = None):
    """Register a pathway selection strategy; ``options`` are what a request may set."""

    def decorate(fn):
        doc = (fn.__doc__ or "").strip().splitlines()
        SELECTIONS.register(name)(Selection(name, fn, doc[0] if doc else name, dict(options or {})))
        return fn
    return decorate
