"""The contribution selection (the paper's): score every neuron by ``|a ⊙ ∂logit_c/∂a|`` in one backward
that stops at the first activation site, and keep those above the per-sample threshold.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Callable, Optional

import torch
from torch import nn

from .options import OptionSpec
from .pathways import Pathway, register_selection, resolve_targets, site_channel_sums, target_sum
from .sites import Site, SiteCall, alias, instrument
from .threshold import keep_above_quantile


class _ContributionProbe(torch.autograd.Function):
    """Identity in the forward; in the backward, hands ``a`` and ``∂s/∂a`` of its site to a sink.

    Its second input is a scalar token shared by all probes: differentiating
    the target sum with respect to the token runs the backward exactly down to
    the first site, and no further.

    It returns a view of ``a`` (no copy), except at a site whose output the
    model modifies in place later (EfficientNetV2's ``result += input``):
    autograd forbids modifying a custom Function's view output in place, and
    the score needs ``a`` as the activation returned it, so there it returns a
    copy that the model may overwrite.
    """

    @staticmethod
    def forward(ctx, a, token, sink, site):
        ctx.save_for_backward(a)
        ctx.sink = sink
        ctx.site = site
        return a.clone() if site.overwritten else alias(a)

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
    on_scored: Optional[Callable[[Site, torch.Tensor], None]] = None,
    allocate: Optional[Callable[[int, int, torch.dtype, torch.device], torch.Tensor]] = None,
):
    """One forward and one partial backward; ``score(a, grad, out)`` writes each site's neuron scores into ``out``.

    ``on_scored(site, out)``, if given, sees each site's scores right after they
    are written (while they are still in cache). ``allocate(batch, neurons,
    dtype, device)``, if given, provides the ``[B, N]`` score buffer (default: a
    new tensor). The activations are released as the backward passes them: when
    this returns, only the scores remain.
    Returns ``(scores [B, N], layout, logits, resolved targets, alive or None)``.
    """
    token = torch.zeros((), device=x.device, dtype=x.dtype, requires_grad=True)
    buffer: dict = {}
    alive_parts: list = []
    reached: set = set()

    def sink(site: Site, a: torch.Tensor, grad: torch.Tensor) -> None:
        out = site.view(buffer["scores"])
        score(a, grad, out)
        if on_scored is not None:
            on_scored(site, out)
        reached.add(site.index)

    def probe(call: SiteCall) -> torch.Tensor:
        out = call.run()
        if record_alive:
            alive_parts.append(call.site.flat(out != 0))
        return _ContributionProbe.apply(out, token, sink, call.site)

    with instrument(model, probe, inputs=x) as recorder:
        logits = model(x.detach())
    layout = recorder.layout
    resolved = resolve_targets(logits.detach(), targets)
    buffer["scores"] = (allocate or _new_buffer)(x.shape[0], layout.total, x.dtype, x.device)
    torch.autograd.grad(target_sum(logits, resolved), token, allow_unused=True)
    for site in layout:
        if site.index not in reached:  # the target does not depend on this site: it contributes nothing
            site.view(buffer["scores"]).zero_()
            if on_scored is not None:
                on_scored(site, site.view(buffer["scores"]))
    alive = torch.cat(alive_parts, dim=1) if record_alive else None
    return buffer["scores"], layout, logits.detach(), resolved, alive


def _new_buffer(batch: int, total: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(batch, total, device=device, dtype=dtype)


#: Largest ``[B, N]`` score buffer, in bytes, that a CPU thread keeps between calls (0: none). glibc hands
#: blocks above 32 MB back to the system when they are freed, so a fresh buffer page-faults in on every call
#: (what that costs: benchmarks/speed/README.md, "Figures the code relies on").
SCORE_WORKSPACE_BYTES = 512 * 2**20


class _ScoreWorkspace(threading.local):
    buffer: Optional[torch.Tensor] = None
    busy: bool = False


_WORKSPACE = _ScoreWorkspace()


@contextlib.contextmanager
def _score_workspace():
    """An ``allocate`` for :func:`score_neurons` that reuses this thread's CPU buffer, for the block's duration."""
    if _WORKSPACE.busy:
        yield None
        return

    def allocate(batch: int, total: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = batch * total
        if device.type != "cpu" or numel * dtype.itemsize > SCORE_WORKSPACE_BYTES:
            return _new_buffer(batch, total, dtype, device)
        held = _WORKSPACE.buffer
        if held is None or held.dtype != dtype or held.numel() < numel:
            _WORKSPACE.buffer = None
            held = _WORKSPACE.buffer = torch.empty(numel, dtype=dtype)
        return held[:numel].view(batch, total)

    _WORKSPACE.busy = True
    try:
        yield allocate
    finally:
        _WORKSPACE.busy = False


def _abs_contribution(a, grad, out):
    torch.mul(a, grad, out=out)
    out.abs_()


def _positive_contribution(a, grad, out):
    torch.mul(a, grad, out=out)
    out.clamp_(min=0)


@register_selection("contribution", options={
    "signed": OptionSpec(bool, False, help="keep only neurons that push the target logit up"),
})
def select_by_contribution(model, x, targets, sparsity, *, signed: bool = False,
                           record_alive: Optional[bool] = None) -> Pathway:
    """Keep the neurons with the largest first-order contribution ``|a ⊙ ∂logit_c/∂a|`` (NeuronMCT).

    ``signed=True`` scores ``max(a ⊙ ∂logit_c/∂a, 0)``: only neurons that push the
    target logit up can be kept.
    ``record_alive``: keep the full network's ``[B, N]`` alive mask on the pathway
    (default: only when a sample's sparsity is so close to 0 that nothing is removed). A dead
    neuron scores 0, and at sparsity > 0 the threshold τ >= 0 removes every score
    <= τ, so otherwise no kept neuron is dead, and the mask and its count (a pass
    over every neuron: benchmarks/speed/README.md, "Figures the code relies on")
    are not needed to say so.
    """
    if record_alive is None:
        record_alive = any(float(p) <= 1e-9 for p in sparsity)  # removal_count is 0 only below this
    sums: dict = {}
    with _score_workspace() as allocate:  # the scores never leave this block: only the bool mask does
        scores, layout, logits, resolved, alive = score_neurons(
            model, x, targets, _positive_contribution if signed else _abs_contribution, record_alive=record_alive,
            on_scored=lambda site, out: sums.__setitem__(site.index, site_channel_sums(out)), allocate=allocate)
        keep = keep_above_quantile(scores, sparsity)
        del scores
    return Pathway(
        selection="contribution_signed" if signed else "contribution",
        layout=layout,
        keep=keep,
        requested_sparsity=list(sparsity),
        targets=resolved,
        logits=logits,
        channel_scores=[sums[site.index] for site in layout],
        alive=alive,
        keeps_no_dead=not record_alive,
    )
