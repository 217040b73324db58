"""Pathway selections the contribution-based one is compared with: random, pruning gates, input resampling,
integrated-gradient neuron scores.

Each is registered with :func:`~handler.engine.pathways.register_selection` and
returns a :class:`~handler.engine.pathways.Pathway` over the same site layout
as the contribution selection, so :func:`~handler.engine.methods.pathway_gradient`
follows any of them unchanged. Every one records which neurons are alive
(non-zero) in the full network, so each summary says how many kept neurons were
dead (``kept_dead_neurons``): the paper's argument against pruning pathways.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .baselines import MAX_SEED, path_chunks
from .options import OptionSpec
from .pathways import Pathway, channel_sums, register_selection, resolve_targets, target_sum
from .threshold import keep_above_quantile, removal_count
from .sites import Site, SiteCall, SiteLayout, instrument

SEED = OptionSpec(int, 0, minimum=0, maximum=MAX_SEED, help="random seed (same seed, same pathway)")


def observe_network(model: nn.Module, x: torch.Tensor) -> tuple:
    """One plain forward without gradients: ``(logits, layout, alive [B, N] bool)``."""
    alive_parts: list = []

    def record(call: SiteCall) -> torch.Tensor:
        out = call.run()
        alive_parts.append(call.site.flat(out != 0))
        return out

    with torch.no_grad(), instrument(model, record, inputs=x) as recorder:
        logits = model(x)
    return logits, recorder.layout, torch.cat(alive_parts, dim=1)


def _seeded(device: torch.device, seed: int) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


# ---------------------------------------------------------------------------
# Random
# ---------------------------------------------------------------------------


@register_selection("random", options={"seed": SEED})
def select_at_random(model, x, targets, sparsity, *, seed: int = 0) -> Pathway:
    """Keep a uniformly random set of neurons: the control with the same sparsity and no information.

    Scores are uniform draws from a generator seeded with ``seed`` (one draw per
    neuron, the same for every sample, so a sample's pathway does not depend on
    its batch), thresholded per sample like any other scores.
    """
    logits, layout, alive = observe_network(model, x.detach())
    scores = torch.rand(layout.total, generator=_seeded(x.device, seed), device=x.device, dtype=torch.float32)
    keep = keep_above_quantile(scores.expand(x.shape[0], -1), sparsity)
    return Pathway("random", layout, keep, list(sparsity), resolve_targets(logits, targets), logits, alive=alive)


# ---------------------------------------------------------------------------
# Pruning gates (CDRP-style distillation-guided routing)
# ---------------------------------------------------------------------------

GATE_L1 = 0.01
GATE_LR = 0.01
GATE_MOMENTUM = 0.9
GATE_MAX = 100.0


@register_selection("pruning_gates", options={
    # An iteration is a forward and a backward through the gated network plus the gates' update: it costs
    # about eight plain passes (benchmarks/speed/README.md), hence its weight in the pass budget.
    "iterations": OptionSpec(int, 100, minimum=1, maximum=1000, help="SGD steps on the gates (authors: up to 1000)",
                             passes=8, server_cap=120),
    "init": OptionSpec(str, "ones", choices=("ones", "random"),
                       help="gate initialisation: ones, or random (uniform in [0, 1))"),
    "seed": SEED,
})
def select_by_pruning_gates(model, x, targets, sparsity, *, iterations: int = 100, init: str = "ones",
                            seed: int = 0) -> Pathway:
    """Keep the neurons whose learned gates are largest (the pruning objective the paper argues against).

    One gate per neuron multiplies each site's output. The gates minimise the
    cross-entropy of the gated network's softmax to the original softmax plus
    ``λ Σ|g|`` (λ = 0.01; SGD, lr 0.01, momentum 0.9; clamped to [0, 100] after
    each step), then the top ``1 - p`` gates of each sample are kept. The loss is
    a sum over samples and SGD is elementwise, so the gates of different samples
    never interact. Only the gates get gradients, never the model's parameters.
    A dead neuron's gate gets no gradient from the cross-entropy (its output is 0
    whatever the gate), only the slow pull of the L1 term: with random
    initialisation many dead neurons keep high gates and are kept.
    """
    x = x.detach()
    logits, layout, alive = observe_network(model, x)
    reference = logits.softmax(dim=1)
    if init == "ones":
        gates = torch.ones(x.shape[0], layout.total, device=x.device, dtype=x.dtype)
    elif init == "random":
        row = torch.rand(layout.total, generator=_seeded(x.device, seed), device=x.device, dtype=x.dtype)
        gates = row.expand(x.shape[0], -1).clone()  # same draws for every sample: batch = one by one
    else:
        raise ValueError(f"init must be 'ones' or 'random', not {init!r}")
    gates.requires_grad_(True)
    optimiser = torch.optim.SGD([gates], lr=GATE_LR, momentum=GATE_MOMENTUM)

    def gated(call: SiteCall) -> torch.Tensor:
        return call.run() * call.site.view(gates)

    distillation = None
    with torch.enable_grad():
        for _ in range(iterations):
            with instrument(model, gated, expected=layout, inputs=x):
                out = model(x)
            distillation = -(reference * out.log_softmax(dim=1)).sum(dim=1)  # [B] cross-entropy to the original
            loss = distillation.sum() + GATE_L1 * gates.abs().sum()
            (gates.grad,) = torch.autograd.grad(loss, gates)
            optimiser.step()
            with torch.no_grad():
                gates.clamp_(0.0, GATE_MAX)
    gates = gates.detach()
    keep = keep_above_quantile(gates, sparsity)
    final = distillation.detach().cpu().tolist()
    details = [{"gates": {"iterations": iterations, "init": init, "final_distillation_loss": final[b]}}
               for b in range(x.shape[0])]
    return Pathway("pruning_gates", layout, keep, list(sparsity), resolve_targets(logits, targets), logits,
                   channel_scores=channel_sums(layout, gates), alive=alive, details=details)


# ---------------------------------------------------------------------------
# Input resampling (Lengerich et al. 2017)
# ---------------------------------------------------------------------------

OVERLAP_TOP_CHANNELS = 5  # the authors compare the top 5 channels per layer by each score


def channel_view(site: Site, flat: torch.Tensor) -> torch.Tensor:
    """``[B, C, P]`` view of a site's slice of ``[B, N]``: channels by positions.

    Channels are dim 1 of images (``[C, H, W]``), the last dim of tokens
    (``[T, C]``), and every neuron of a flat ``[C]`` output is its own channel,
    as in :func:`~handler.engine.pathways.channel_sums`.
    """
    view = site.view(flat)
    if view.dim() == 2:
        return view.unsqueeze(2)
    if view.dim() == 3:
        return view.transpose(1, 2)
    return view.flatten(2)


class ResamplingStatistics:
    """Streaming per-neuron sums over the copies of each sample, shifted by the clean copy's values.

    Keeps ``Σd, Σd², Σd·u`` per neuron and ``Σu, Σu²`` per sample, with
    ``d = a_k - a_0`` and ``u = y_k - y_0`` (the clean copy as shift: variances and
    covariances are shift-invariant, and the shift avoids the cancellation of raw
    ``Σa²/n - (Σa/n)²`` in float32). Nothing per copy is stored beyond one chunk.
    """

    def __init__(self, batch: int, neurons: int, classes: int, copies: int, device, dtype):
        zeros = lambda *shape: torch.zeros(*shape, device=device, dtype=dtype)  # noqa: E731
        self.clean = zeros(batch, neurons)
        self.sum_d, self.sum_d2, self.sum_du = zeros(batch, neurons), zeros(batch, neurons), zeros(batch, neurons)
        self.clean_y, self.sum_u, self.sum_u2 = zeros(batch), zeros(batch), zeros(batch)
        self.logits = zeros(batch, classes)
        self.targets = torch.zeros(batch, dtype=torch.long, device=device)
        self.copies = copies

    def add(self, layout: SiteLayout, copy: torch.Tensor, sample: torch.Tensor, acts: torch.Tensor,
            logits: torch.Tensor, targets: torch.Tensor) -> None:
        """One chunk: rows are (copy index, sample index); ``acts`` ``[R, N]`` holds each row's site outputs."""
        clean = copy == 0
        if clean.any():  # point-major chunks: a sample's clean copy comes before all its other copies
            rows, owners = clean.nonzero().squeeze(1), sample[clean]
            self.clean[owners] = acts[rows]
            self.logits[owners] = logits[rows].to(self.logits.dtype)
            self.targets[owners] = resolve_targets(logits[rows], targets[owners])
        probs = logits.softmax(dim=1).gather(1, self.targets[sample][:, None]).squeeze(1).to(acts.dtype)
        if clean.any():
            self.clean_y[sample[clean]] = probs[clean]
        u = probs - self.clean_y[sample]
        self.sum_u.index_add_(0, sample, u)
        self.sum_u2.index_add_(0, sample, u * u)
        for site in layout:  # per site, to keep the temporaries small
            span = slice(site.offset, site.offset + site.numel)
            d = acts[:, span] - self.clean[sample, span]
            self.sum_d[:, span].index_add_(0, sample, d)
            self.sum_du[:, span].index_add_(0, sample, d * u[:, None])
            d.mul_(d)
            self.sum_d2[:, span].index_add_(0, sample, d)

    def scores(self, layout: SiteLayout, min_activation: float) -> dict:
        """Per site ``[B, C]``: correlation and precision scores, and which channels each is defined for."""
        n = float(self.copies)
        mean_u = self.sum_u / n
        var_y = (self.sum_u2 / n - mean_u * mean_u).clamp(min=0)  # [B]
        out = {"correlation": [], "correlation_defined": [], "precision": [], "precision_defined": []}
        for site in layout:
            sum_d = channel_view(site, self.sum_d)
            sum_d2 = channel_view(site, self.sum_d2)
            mean_d = sum_d / n
            var_a = (sum_d2 / n - mean_d * mean_d).clamp(min=0)
            cov = channel_view(site, self.sum_du) / n - mean_d * mean_u[:, None, None]
            varying = (sum_d2 > 0) & (var_y[:, None, None] > 0)  # constant positions are skipped
            r = (cov / (var_a * var_y[:, None, None]).sqrt()).abs()
            r = torch.where(varying, r.clamp(max=1), torch.zeros_like(r))
            counted = varying.sum(dim=2)
            correlation = r.sum(dim=2) / counted.clamp(min=1)
            mean_activation = (channel_view(site, self.clean) + mean_d).mean(dim=2)
            mean_variance = var_a.mean(dim=2)
            precision_defined = mean_activation >= min_activation
            precision = torch.where(precision_defined, 1.0 / mean_variance.clamp(min=1e-12),
                                    torch.zeros_like(mean_variance))
            out["correlation"].append(correlation)
            out["correlation_defined"].append(counted > 0)
            out["precision"].append(precision)
            out["precision_defined"].append(precision_defined)
        out["output_variance"] = var_y
        return out


def resample(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, copies: int, noise: float, seed: int,
             chunk_size: int) -> tuple:
    """Forward ``copies`` perturbed copies of each sample, ``chunk_size`` model inputs at a time.

    Copy ``k`` is ``x ⊙ (1 + k·ε)`` with one field ``ε ~ N(0, noise²)`` per channel
    and pixel (drawn once from ``seed``, shared by all samples and copies; copy 0
    is the clean input). Returns ``(ResamplingStatistics, layout)``.
    """
    epsilon = torch.randn(x.shape[1:], generator=_seeded(x.device, seed), device=x.device, dtype=x.dtype) * noise
    layout = None
    stats = None
    for k, b in path_chunks(copies, x.shape[0], chunk_size):
        k = torch.tensor(k, device=x.device)
        b = torch.tensor(b, device=x.device)
        inputs = x[b] * (1 + k.to(x.dtype).view(-1, *([1] * (x.dim() - 1))) * epsilon)
        acts = None if layout is None else torch.empty(len(b), layout.total, device=x.device, dtype=x.dtype)
        parts: list = []

        def record(call: SiteCall) -> torch.Tensor:  # copies each output at once: later in-place ops cannot alter it
            out = call.run()
            if acts is None:  # first chunk: the layout (and so the buffer's width) is not known yet
                parts.append(call.site.flat(out).clone())
            else:
                call.site.view(acts).copy_(out)
            return out

        with torch.no_grad(), instrument(model, record, expected=layout, inputs=inputs) as recorder:
            logits = model(inputs)
        if layout is None:
            layout = recorder.layout
            acts = torch.cat(parts, dim=1)
            stats = ResamplingStatistics(x.shape[0], layout.total, logits.shape[1], copies, x.device, x.dtype)
        stats.add(layout, k, b, acts, logits, targets)
    return stats, layout


def _top_channels(scores: torch.Tensor, defined: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``[B, C]`` bool: per row, the ``counts[b]`` best-scoring channels among the defined ones (ties: lower index)."""
    ranked = torch.where(defined, scores, torch.full_like(scores, float("-inf")))
    order = ranked.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(scores.shape[1], device=scores.device).expand_as(order))
    return (rank < counts[:, None]) & defined


def _channel_overlap(scores: dict, top: int) -> torch.Tensor:
    """Per sample, ``|A∩B| / (|A|+|B|)`` of the top-``top`` channels per site by correlation (A), precision (B)."""
    shared = sizes = 0
    for corr, corr_ok, prec, prec_ok in zip(scores["correlation"], scores["correlation_defined"],
                                            scores["precision"], scores["precision_defined"]):
        counts = torch.full((corr.shape[0],), min(top, corr.shape[1]), device=corr.device)
        a = _top_channels(corr, corr_ok, counts)
        b = _top_channels(prec, prec_ok, counts)
        shared = shared + (a & b).sum(dim=1)
        sizes = sizes + a.sum(dim=1) + b.sum(dim=1)
    return shared.double() / torch.as_tensor(sizes).clamp(min=1).double()


def broadcast_channels(site: Site, chosen: torch.Tensor) -> torch.Tensor:
    """A per-channel ``[B, C]`` mask spread over the site's neurons ``[B, *shape]`` (as in :func:`channel_view`)."""
    if len(site.shape) == 1:
        return chosen
    if len(site.shape) == 2:
        return chosen[:, None, :].expand(-1, *site.shape)
    return chosen.view(*chosen.shape, *([1] * (len(site.shape) - 1))).expand(-1, *site.shape)


def select_resampled_channels(score: str, model, x, targets, sparsity: Sequence[float], *, copies: int,
                              noise: float, seed: int, chunk_size: int, min_activation: float) -> Pathway:
    """The pathway of the channels with the highest resampling ``score`` (``correlation`` or ``precision``).

    Per site, the top ``C - ceil(p·C)`` channels by the score are kept whole (all
    their positions), among the channels the score is defined for; so each site
    keeps at most a ``1 - p`` fraction of its neurons and the realised sparsity is
    never below ``p`` (above it where fewer channels are scored than the quota).
    Per site rather than one global threshold, because the scores of different
    layers are not on one scale (precision is ``1/variance`` of activations of
    very different magnitudes), and because the authors compare channels per
    layer. Both scores come from the same streaming sums, so the summary reports
    ``channel_overlap``, the authors' ``|A∩B| / (|A|+|B|)`` of the top-5 channels
    per site by correlation (A) and by precision (B), whichever one selected.
    """
    x = x.detach()
    stats, layout = resample(model, x, targets, copies, noise, seed, chunk_size)
    scores = stats.scores(layout, min_activation)
    keep = torch.zeros(x.shape[0], layout.total, dtype=torch.bool, device=x.device)
    channel_scores = []
    kept_channels = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    defined_channels = torch.zeros_like(kept_channels)
    for i, site in enumerate(layout):
        site_scores, defined = scores[score][i], scores[f"{score}_defined"][i]
        channels = site_scores.shape[1]
        quota = torch.tensor([channels - removal_count(float(p), channels) for p in sparsity], device=x.device)
        chosen = _top_channels(site_scores, defined, quota)
        site.view(keep).copy_(broadcast_channels(site, chosen))
        channel_scores.append(site_scores)
        kept_channels += chosen.sum(dim=1)
        defined_channels += defined.sum(dim=1)
    total_channels = sum(scores[score][i].shape[1] for i in range(len(layout)))
    overlap = _channel_overlap(scores, OVERLAP_TOP_CHANNELS).cpu().tolist()
    kept_channels, defined_channels = kept_channels.cpu().tolist(), defined_channels.cpu().tolist()
    output_variance = scores["output_variance"].double().cpu().tolist()
    details = [{"resampling": {
        "score": score, "copies": copies, "noise": noise, "seed": seed,
        "kept_channels": int(kept_channels[b]), "scored_channels": int(defined_channels[b]),
        "total_channels": total_channels,
        "channel_overlap": float(overlap[b]), "overlap_top_channels_per_site": OVERLAP_TOP_CHANNELS,
        "output_variance": float(output_variance[b]),
    }} for b in range(x.shape[0])]
    return Pathway(f"resampling_{score}", layout, keep, list(sparsity), stats.targets, stats.logits,
                   channel_scores=channel_scores, alive=stats.clean != 0, details=details)


RESAMPLING_OPTIONS = {
    "copies": OptionSpec(int, 50, minimum=2, maximum=256, help="perturbed copies, copy 0 clean (authors: 50)",
                         passes=1, server_cap=64),
    "noise": OptionSpec(float, 0.1, minimum=0.001, maximum=1.0,
                        help="σ of ε; copy k is x·(1 + k·ε) (at 0 every copy is the input: nothing to score)"),
    "seed": SEED,
    "chunk_size": OptionSpec(int, 16, minimum=1, maximum=256,
                             help="copies per forward pass (memory: chunk × all site outputs)"),
    "min_activation": OptionSpec(float, 0.1, minimum=0.0,
                                 help="precision is scored only for channels whose mean activation reaches this"),
}


@register_selection("resampling_correlation", options=RESAMPLING_OPTIONS)
def select_by_resampling_correlation(model, x, targets, sparsity, *, copies: int = 50, noise: float = 0.1,
                                     seed: int = 0, chunk_size: int = 16, min_activation: float = 0.1) -> Pathway:
    """Keep the channels whose activations track the output over resampled inputs (Lengerich et al. 2017).

    Over ``copies`` perturbed copies (see :func:`resample`), a channel's score is
    the mean over its positions of ``|Pearson_k(a, y_k)|``, ``y_k`` the softmax
    probability of the target; positions with constant activation are skipped,
    and a channel with no varying position is not scored. Sizing: see
    :func:`select_resampled_channels`.
    """
    return select_resampled_channels("correlation", model, x, targets, sparsity, copies=copies, noise=noise,
                                     seed=seed, chunk_size=chunk_size, min_activation=min_activation)


@register_selection("resampling_precision", options=RESAMPLING_OPTIONS)
def select_by_resampling_precision(model, x, targets, sparsity, *, copies: int = 50, noise: float = 0.1,
                                   seed: int = 0, chunk_size: int = 16, min_activation: float = 0.1) -> Pathway:
    """Keep the channels whose activations are most stable over resampled inputs (Lengerich et al. 2017).

    Over ``copies`` perturbed copies (see :func:`resample`), a channel's score is
    ``1 / mean over positions of Var_k(a)`` (population variance), defined only
    for channels whose mean activation is at least ``min_activation`` (authors:
    0.1). Sizing: see :func:`select_resampled_channels`.
    """
    return select_resampled_channels("precision", model, x, targets, sparsity, copies=copies, noise=noise,
                                     seed=seed, chunk_size=chunk_size, min_activation=min_activation)


# ---------------------------------------------------------------------------
# Integrated-gradient neuron scores ("NeuronIntGrad", Khakzar et al. 2021)
# ---------------------------------------------------------------------------


def neuron_integrated_gradients(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, steps: int,
                                chunk_size: int) -> tuple:
    """Each neuron's integrated gradient along its own layer: ``a · mean_α ∂y/∂(α a)``, signed.

    Per selectable site, the site's output ``a`` is scaled by ``α`` (midpoints of ``steps`` equal intervals
    of [0, 1]) while every other site runs as usual, and ``y`` (the target logit) is differentiated with
    respect to the scaled output; the backward stops there. So a site's attributions add up, to the Riemann
    error, to ``y`` minus ``y`` with that site's output zeroed (integrated gradients' completeness, per
    layer). One forward and a partial backward per site and step: ``chunk_size`` model inputs at a time,
    point-major (a batch gives each sample the bits it gets alone at the same chunk shape).
    Returns ``(attributions [B, N], activations [B, N], layout, logits, resolved targets)``.
    """
    x = x.detach()
    parts: list = []

    def record(call: SiteCall) -> torch.Tensor:
        out = call.run()
        parts.append(call.site.flat(out).clone())  # later in-place ops of the model cannot alter the copy
        return out

    with torch.no_grad(), instrument(model, record, inputs=x) as recorder:
        logits = model(x)
    layout = recorder.layout
    activations = torch.cat(parts, dim=1)
    resolved = resolve_targets(logits, targets)
    attributions = torch.zeros_like(activations)
    for site in layout:
        summed = torch.zeros(x.shape[0], site.numel, device=x.device, dtype=x.dtype)
        for k, b in path_chunks(steps, x.shape[0], chunk_size):
            alphas = (torch.tensor(k, device=x.device, dtype=x.dtype) + 0.5) / steps
            rows = torch.tensor(b, device=x.device)
            scaled: list = []

            def scale(call: SiteCall, site=site, alphas=alphas, scaled=scaled) -> torch.Tensor:
                out = call.run()
                if call.site.index != site.index:
                    return out
                z = (out.detach() * alphas.view(-1, *([1] * (out.dim() - 1)))).requires_grad_(True)
                scaled.append(z)
                return z.clone() if site.overwritten else z  # the model may add to it in place

            inputs = x[rows]
            with torch.enable_grad(), instrument(model, scale, expected=layout, inputs=inputs):
                out = model(inputs)
                (grad,) = torch.autograd.grad(target_sum(out, resolved[rows]), scaled, allow_unused=True)
            if grad is not None:  # None: the target does not depend on this site
                summed.index_add_(0, rows, site.flat(grad))
        span = slice(site.offset, site.offset + site.numel)
        attributions[:, span] = activations[:, span] * summed / steps
    return attributions, activations, layout, logits, resolved


@register_selection("neuron_integrated_gradients", options={
    # One forward and a partial backward per activation site and step: the pass budget counts 50 sites per
    # step (EfficientNet-Lite0 has 33, ResNet-50 49, VGG-16 15), so a server's max_passes_per_request bounds
    # it (the archive's 1000: up to 19 steps). No cap of its own: caps are by option name, and integrated
    # gradients' "steps" has a higher one.
    "steps": OptionSpec(int, 10, minimum=1, maximum=64, help="points on each layer's path from 0 to its output "
                        "(authors: about 10)", passes=50),
    "chunk_size": OptionSpec(int, 16, minimum=1, maximum=256,
                             help="model inputs per pass (memory: chunk × the activations after the site)"),
})
def select_by_neuron_integrated_gradients(model, x, targets, sparsity, *, steps: int = 10,
                                          chunk_size: int = 16) -> Pathway:
    """Keep the neurons with the largest integrated gradient along their own layer ("NeuronIntGrad").

    The paper's costlier alternative to the first-order contribution: ``|a · mean_α ∂y/∂(α a)|`` with the
    layer's output scaled from 0 to itself (:func:`neuron_integrated_gradients`), then the same per-sample
    threshold over all sites. Where ``y`` is linear in a layer's output from there on, the score equals the
    contribution ``|a · ∂y/∂a|``; elsewhere it accounts for the ReLUs after the layer switching along the path.
    """
    attributions, activations, layout, logits, resolved = neuron_integrated_gradients(
        model, x, targets, steps, chunk_size)
    scores = attributions.abs_()
    keep = keep_above_quantile(scores, sparsity)
    details = [{"integrated_gradients": {"steps": steps}} for _ in range(x.shape[0])]
    return Pathway("neuron_integrated_gradients", layout, keep, list(sparsity), resolved, logits,
                   channel_scores=channel_sums(layout, scores), alive=activations != 0, details=details)
