"""Pathways: per-sample binary masks over all neurons, how they are selected, and how a network runs along one.

A selection strategy scores every neuron of every activation site for one input
and target; :func:`keep_above_quantile` then removes, per sample, every neuron
whose score is at most the ``p``-quantile of that sample's scores (one global
threshold over all sites, Khakzar et al. 2021). Everything stays on the model's
device: the threshold is a ``kthvalue`` per row, never a host round trip.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from .options import OptionSpec
from .registry import Registry
from .sites import Site, SiteCall, SiteLayout, instrument


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

    @property
    def batch_size(self) -> int:
        return self.keep.shape[0]

    def realised_sparsity(self) -> torch.Tensor:
        return 1.0 - self.keep.sum(dim=1, dtype=torch.float64) / self.layout.total

    def summaries(self, top_channels: int = 3) -> list:
        """One JSON-ready summary per sample (a single device-to-host transfer per quantity)."""
        kept_per_site = torch.stack([site.view(self.keep).flatten(1).sum(1) for site in self.layout], 1)
        kept_per_site = kept_per_site.cpu().tolist()
        realised = self.realised_sparsity().cpu().tolist()
        dead_kept = None
        if self.alive is not None:
            dead_kept = (self.keep & ~self.alive).sum(1).cpu().tolist()
        channels = None
        if self.channel_scores is not None:
            channels = [
                scores.topk(min(top_channels, scores.shape[1]), dim=1).indices.cpu().tolist()
                for scores in self.channel_scores
            ]
        out = []
        for b in range(self.batch_size):
            kept_total = int(sum(kept_per_site[b]))
            sites = []
            for i, site in enumerate(self.layout):
                entry = {
                    "name": site.name,
                    "kind": site.kind,
                    "shape": list(site.shape),
                    "kept": int(kept_per_site[b][i]),
                    "total": site.numel,
                }
                if channels is not None:
                    entry["top_channels"] = channels[i][b]
                sites.append(entry)
            summary = {
                "selection": self.selection,
                "requested_sparsity": float(self.requested_sparsity[b]),
                "realised_sparsity": float(realised[b]),
                "kept_neurons": kept_total,
                "total_neurons": self.layout.total,
                "locally_linear": self.layout.locally_linear,
                "nonlinear_activations": self.layout.nonlinear_kinds,
            }
            if dead_kept is not None:
                summary["kept_dead_neurons"] = int(dead_kept[b])
            if self.details:
                summary.update(self.details[b])
            summary["sites"] = sites
            out.append(summary)
        return out


def resolve_targets(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each sample's target class: the given index, or the predicted class where it is negative."""
    return torch.where(targets < 0, logits.argmax(dim=1), targets)


def target_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ_b logit[b, c_b]: one backward gives every sample's gradient (samples are independent in eval mode)."""
    return logits.gather(1, targets[:, None]).sum()


def removal_count(sparsity: float, total: int) -> int:
    """How many of ``total`` neurons the ``sparsity``-quantile threshold removes at least."""
    return min(total, math.ceil(sparsity * total - 1e-9))


def keep_above_quantile(scores: torch.Tensor, sparsity: Sequence[float]) -> torch.Tensor:
    """Keep, per row, the neurons scoring strictly above the row's ``p``-quantile.

    Ties at the threshold are removed too (dead neurons all score 0), so the
    realised sparsity can exceed the requested one; it never falls below it.
    """
    batch, total = scores.shape
    counts = [removal_count(float(p), total) for p in sparsity]
    if all(k == 0 for k in counts):
        return torch.ones_like(scores, dtype=torch.bool)
    tau = kth_smallest(scores, counts)
    keep = scores > tau[:, None]
    for b, k in enumerate(counts):
        if k == 0:
            keep[b] = True
    return keep


def kth_smallest(scores: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Per row, the ``k``-th smallest value (1-based; rows with ``k = 0`` get ``-inf``), exactly.

    On the GPU a batched ``kthvalue`` (radix select on the device, no host
    round trip). On the CPU ``kthvalue`` is a single-threaded quickselect over
    millions of neurons, so non-negative float32 rows use a radix select
    instead: a histogram of the upper 16 bits of the float's bit pattern (its
    order equals the float order for non-negative values) finds the bucket
    holding the ``k``-th value; the exact value is a small ``kthvalue`` inside it.
    """
    ks = [int(k) for k in ks]
    out = torch.full((scores.shape[0],), float("-inf"), device=scores.device, dtype=scores.dtype)
    if scores.device.type != "cpu" or scores.dtype != torch.float32:
        if len(set(ks)) == 1 and ks[0] > 0:
            return scores.kthvalue(ks[0], dim=1).values
        for b, k in enumerate(ks):
            if k > 0:
                out[b] = scores[b].kthvalue(k).values
        return out
    for b, k in enumerate(ks):
        if k > 0:
            out[b] = _radix_kth_cpu(scores[b], k)
    return out


def _radix_kth_cpu(row: torch.Tensor, k: int) -> torch.Tensor:
    # The upper 16 bits of each float32, read straight from memory (no shift): the odd int16 halves on a
    # little-endian machine, the even ones on a big-endian one.
    upper = row.view(torch.int16)[(1 if sys.byteorder == "little" else 0)::2].contiguous()
    try:
        counts = torch.bincount(upper, minlength=1 << 15)
    except RuntimeError:  # a negative value (or -0.0): the bit order is not the float order
        return row.kthvalue(k).values
    cumulative = counts.cumsum(0)
    bucket = int(torch.searchsorted(cumulative, k))
    before = int(cumulative[bucket - 1]) if bucket else 0
    return row[upper == bucket].kthvalue(k - before).values


def channel_sums(layout: SiteLayout, scores: torch.Tensor) -> list:
    """Per site, each channel's summed score ``[B, C]`` (channels: dim 1 of images, last dim of tokens)."""
    out = []
    for site in layout:
        view = site.view(scores)
        if view.dim() == 4:
            out.append(view.sum(dim=(2, 3)))
        elif view.dim() == 3:
            out.append(view.sum(dim=1))
        else:
            out.append(view.flatten(1))
    return out


def run_along(model: nn.Module, x: torch.Tensor, pathway: Pathway) -> torch.Tensor:
    """Forward ``x`` through ``model`` with every site's output multiplied by the pathway's fixed mask."""
    if x.shape[0] != pathway.batch_size:
        raise ValueError(f"input batch {x.shape[0]} does not match the pathway's batch {pathway.batch_size}")
    keep = pathway.keep

    def mask(call: SiteCall) -> torch.Tensor:
        if call.may_modify_input:  # zero the removed inputs, then let the activation run in place: no copies
            call.input.mul_(call.site.view(keep))
            return call.run()
        return call.run() * call.site.view(keep)

    with instrument(model, mask, expected=pathway.layout):
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


SELECTIONS: Registry = Registry("pathway selection")


def register_selection(name: str, *, options: Optional[Mapping[str, OptionSpec]] = None):
    """Register a pathway selection strategy; ``options`` are what a request may set."""

    def decorate(fn):
        doc = (fn.__doc__ or "").strip().splitlines()
        SELECTIONS.register(name)(Selection(name, fn, doc[0] if doc else name, dict(options or {})))
        return fn
    return decorate


class _ContributionProbe(torch.autograd.Function):
    """Identity in the forward; in the backward, hands ``a`` and ``∂s/∂a`` of its site to a sink.

    Its second input is a scalar token shared by all probes: differentiating
    the target sum with respect to the token runs the backward exactly down to
    the first site, and no further.
    """

    @staticmethod
    def forward(ctx, a, token, sink, site):
        ctx.save_for_backward(a)
        ctx.sink = sink
        ctx.site = site
        return a.view_as(a)

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved_tensors
        ctx.sink(ctx.site, a, grad)
        return grad, None, None, None


def score_neurons(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    score: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None],
    *,
    record_alive: bool = False,
):
    """One forward and one partial backward; ``score(a, grad, out)`` writes each site's neuron scores into ``out``.

    Returns ``(scores [B, N], layout, logits, resolved targets, alive or None)``.
    """
    token = torch.zeros((), device=x.device, dtype=x.dtype, requires_grad=True)
    buffer: dict = {}
    alive_parts: list = []
    reached: set = set()

    def sink(site: Site, a: torch.Tensor, grad: torch.Tensor) -> None:
        score(a, grad, site.view(buffer["scores"]))
        reached.add(site.index)

    def probe(call: SiteCall) -> torch.Tensor:
        out = call.run()
        if record_alive:
            alive_parts.append((out != 0).flatten(1))
        return _ContributionProbe.apply(out, token, sink, call.site)

    with instrument(model, probe) as recorder:
        logits = model(x.detach())
    layout = recorder.layout
    resolved = resolve_targets(logits.detach(), targets)
    buffer["scores"] = torch.empty(x.shape[0], layout.total, device=x.device, dtype=x.dtype)
    torch.autograd.grad(target_sum(logits, resolved), token, allow_unused=True)
    for site in layout:
        if site.index not in reached:  # the target does not depend on this site: it contributes nothing
            site.view(buffer["scores"]).zero_()
    alive = torch.cat(alive_parts, dim=1) if record_alive else None
    return buffer["scores"], layout, logits.detach(), resolved, alive


def _abs_contribution(a, grad, out):
    torch.mul(a, grad, out=out)
    out.abs_()


def _positive_contribution(a, grad, out):
    torch.mul(a, grad, out=out)
    out.clamp_(min=0)


@register_selection("contribution", options={
    "signed": OptionSpec(bool, False, help="keep only neurons that push the target logit up"),
})
def select_by_contribution(model, x, targets, sparsity, *, signed: bool = False, record_alive: bool = True) -> Pathway:
    """Keep the neurons with the largest first-order contribution ``|a ⊙ ∂logit_c/∂a|`` (NeuronMCT).

    ``signed=True`` scores ``max(a ⊙ ∂logit_c/∂a, 0)``: only neurons that push the
    target logit up can be kept.
    """
    scores, layout, logits, resolved, alive = score_neurons(
        model, x, targets, _positive_contribution if signed else _abs_contribution, record_alive=record_alive)
    keep = keep_above_quantile(scores, sparsity)
    return Pathway(
        selection="contribution_signed" if signed else "contribution",
        layout=layout,
        keep=keep,
        requested_sparsity=list(sparsity),
        targets=resolved,
        logits=logits,
        channel_scores=channel_sums(layout, scores),
        alive=alive,
    )
