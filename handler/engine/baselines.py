"""Input-level attribution methods the pathway gradient is measured against (docs/methods.md).

Each is registered like :func:`~handler.engine.methods.pathway_gradient`: batched
(one target per sample, ``-1`` = the predicted class), on whatever device ``x``
lives on, returning maps over the normalised input (``[B, C, H, W]``, or
``[B, 1, H, W]`` for Grad-CAM) for the shared channel reductions.

Methods that evaluate the network at many points (integrated gradients,
SmoothGrad) walk those points ``chunk_size`` model inputs at a time: the
``steps × batch`` (or ``samples × batch``) inputs are never built at once.
Instrumentation (guided backprop's rectified sites, Grad-CAM's captured layer)
goes through :mod:`.sites`, like everything else that touches a forward pass.
"""

from __future__ import annotations

import math
from typing import Iterator, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InvalidOption
from .methods import Attribution, input_gradient, register_method
from .normalisation import InputNormalisation
from .options import OptionSpec
from .pathways import resolve_targets, target_sum
from .sites import (
    PER_SAMPLE, CapturedOutput, SiteCall, UncapturableOutputError, alias, capture_module_output, capture_site_output,
    instrument)

#: Largest seed the ``seed`` options accept (what fits a JSON number exactly and ``Generator.manual_seed``).
MAX_SEED = 2**32 - 1

CHUNK_SIZE = OptionSpec(int, 32, minimum=1, maximum=1024,
                        help="model inputs per forward/backward pass (bounds memory, not the result)")


@register_method("input_x_gradient")
def input_x_gradient(model, x, targets) -> Attribution:
    """Input times gradient: each input feature's first-order Taylor term ``x ⊙ ∂logit_c/∂x``."""
    grad, logits, resolved = input_gradient(model, x, targets)
    return Attribution(x.detach() * grad, logits, resolved)


# ---------------------------------------------------------------------------
# Integrated gradients
# ---------------------------------------------------------------------------

INTEGRATION_RULES = ("gausslegendre", "riemann_left", "riemann_middle", "riemann_right", "riemann_trapezoid")
BASELINES = ("black", "zero", "blur")


def integration_rule(name: str, steps: int) -> tuple:
    """Nodes ``α_k`` in [0, 1] and weights ``w_k`` with ``Σ_k w_k g(α_k) ≈ ∫₀¹ g(α) dα`` (lists of floats).

    The rules are Captum's, with its names and its nodes (Riemann nodes from a
    float32 ``linspace``, as Captum builds them, so a cross-check evaluates the
    very same points; a ReLU network's gradient can jump between points one ulp
    apart). The weights are Captum's too except for ``riemann_trapezoid``: Captum
    weights its ``n`` nodes ``linspace(0, 1, n)`` by ``1/n`` (halved at the ends),
    which sum to ``1 - 1/n``, so its trapezoid attributions are short by the
    factor ``(n-1)/n`` and break completeness even on a linear model. Here they
    are ``1/(n-1)`` (halved at the ends) and sum to 1.
    """
    n = int(steps)
    if name == "gausslegendre":
        if n < 1:
            raise ValueError("gausslegendre needs at least 1 step")
        nodes, weights = np.polynomial.legendre.leggauss(n)
        return (0.5 * (1.0 + nodes)).tolist(), (0.5 * weights).tolist()
    if name not in INTEGRATION_RULES:
        raise ValueError(f"unknown integration rule {name!r}; choose one of: {', '.join(INTEGRATION_RULES)}")
    if n < 2:
        raise ValueError(f"{name} needs at least 2 steps")
    if name == "riemann_trapezoid":
        weights = [1.0 / (n - 1)] * n
        weights[0] /= 2
        weights[-1] /= 2
        return torch.linspace(0, 1, n).tolist(), weights
    first, last = {"riemann_left": (0.0, 1 - 1 / n), "riemann_middle": (1 / (2 * n), 1 - 1 / (2 * n)),
                   "riemann_right": (1 / n, 1.0)}[name]
    return torch.linspace(first, last, n).tolist(), [1.0 / n] * n


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of ``[B, C, H, W]`` (radius ``ceil(3σ)``, edges replicated).

    Per-channel normalisation is affine and the kernel sums to 1, so blurring the
    normalised input equals normalising the blurred image.
    """
    radius = max(1, math.ceil(3.0 * sigma))
    offsets = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (offsets / sigma) ** 2)
    kernel = kernel / kernel.sum()
    channels = x.shape[1]
    across = kernel.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    down = kernel.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)
    out = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), across, groups=channels)
    return F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), down, groups=channels)


def input_baseline(kind: str, x: torch.Tensor, normalisation: InputNormalisation, blur_sigma: float) -> torch.Tensor:
    """The reference input in normalised space: ``zero`` (the all-zero tensor, i.e. the mean colour),
    ``black`` (the image that is black in pixel space) or ``blur`` (the input, Gaussian-blurred)."""
    if kind == "zero":
        return torch.zeros_like(x)
    if kind == "black":
        return normalisation.black(x)
    if kind == "blur":
        if x.dim() != 4:
            raise InvalidOption(f"baseline 'blur' needs [B, C, H, W] images, got {tuple(x.shape)}")
        return gaussian_blur(x, blur_sigma)
    raise InvalidOption(f"baseline must be one of {', '.join(BASELINES)}, not {kind!r}")


def path_chunks(points: int, batch: int, chunk_size: int) -> Iterator[tuple]:
    """``(k, b)`` index lists over ``points`` evaluation points per sample, point-major, ``chunk_size`` at a time.

    Point-major order means every sample meets its points in the same order
    whatever the batch and chunk sizes, so a batch accumulates exactly as its
    samples would one by one.
    """
    total = points * batch
    for start in range(0, total, chunk_size):
        rows = range(start, min(start + chunk_size, total))
        yield [r // batch for r in rows], [r % batch for r in rows]


def _per_row(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))


@register_method("integrated_gradients", uses_normalisation=True, options={
    "steps": OptionSpec(int, 50, minimum=2, maximum=256, help="points on the path from the baseline to the input",
                        passes=1, server_cap=128),
    "baseline": OptionSpec(str, "black", choices=BASELINES,
                           help="black (black in pixel space), zero (all-zero normalised input) or blur"),
    "integration": OptionSpec(str, "gausslegendre", choices=INTEGRATION_RULES,
                              help="quadrature rule (Captum's names)"),
    "blur_sigma": OptionSpec(float, 5.0, minimum=0.5, maximum=64.0,
                             help="Gaussian σ in pixels of the blur baseline"),
    "chunk_size": CHUNK_SIZE,
})
def integrated_gradients(
    model,
    x,
    targets,
    *,
    steps: int = 50,
    baseline: str = "black",
    integration: str = "gausslegendre",
    blur_sigma: float = 5.0,
    chunk_size: int = 32,
    normalisation: Optional[InputNormalisation] = None,
) -> Attribution:
    """Integrated gradients ``(x - x') ⊙ ∫₀¹ ∂logit_c/∂x (x' + α(x - x')) dα`` (Sundararajan et al. 2017).

    Completeness: the attributions sum to ``logit_c(x) - logit_c(x')`` up to the
    quadrature error. ``normalisation`` defines the black baseline (default:
    ImageNet statistics; the Explainer passes the model's own).
    """
    x = x.detach()
    start = input_baseline(baseline, x, normalisation or InputNormalisation(), blur_sigma)
    with torch.no_grad():
        logits = model(x)
    resolved = resolve_targets(logits, targets)
    try:
        alphas, weights = integration_rule(integration, steps)
    except ValueError as err:
        raise InvalidOption(str(err)) from None
    alphas = torch.tensor(alphas, dtype=x.dtype, device=x.device)
    weights = torch.tensor(weights, dtype=x.dtype, device=x.device)
    span = x - start
    path_sum = torch.zeros_like(x)
    for k, b in path_chunks(steps, x.shape[0], chunk_size):
        k = torch.tensor(k, device=x.device)
        b = torch.tensor(b, device=x.device)
        points = start[b] + _per_row(alphas[k], x) * span[b]
        grad, _, _ = input_gradient(model, points, resolved[b])
        path_sum.index_add_(0, b, grad * _per_row(weights[k], x))
    return Attribution(path_sum * span, logits, resolved)


# ---------------------------------------------------------------------------
# SmoothGrad
# ---------------------------------------------------------------------------


@register_method("smoothgrad", options={
    "samples": OptionSpec(int, 50, minimum=1, maximum=256, help="noisy copies averaged", passes=1, server_cap=64),
    "noise": OptionSpec(float, 0.15, minimum=0.0, maximum=1.0,
                        help="noise σ as a fraction of each input's value range (max - min)"),
    "seed": OptionSpec(int, 0, minimum=0, maximum=MAX_SEED, help="seed of the noise (same seed, same map)"),
    "chunk_size": CHUNK_SIZE,
})
def smoothgrad(model, x, targets, *, samples: int = 50, noise: float = 0.15, seed: int = 0,
               chunk_size: int = 32) -> Attribution:
    """SmoothGrad: the gradient averaged over copies of the input with Gaussian noise (Smilkov et al. 2017).

    σ is ``noise × (max(x) - min(x))`` per sample, as in the paper. Every sample
    draws its noise from its own generator seeded with ``seed``, so a sample's
    map depends on the seed and the device, never on what it was batched with.
    The target is the class of the clean input.
    """
    x = x.detach()
    with torch.no_grad():
        logits = model(x)
    resolved = resolve_targets(logits, targets)
    flat = x.flatten(1)
    sigma = noise * (flat.amax(dim=1) - flat.amin(dim=1))
    streams = [torch.Generator(device=x.device) for _ in range(x.shape[0])]
    for stream in streams:
        stream.manual_seed(seed)
    gradient_sum = torch.zeros_like(x)
    for _, b in path_chunks(samples, x.shape[0], chunk_size):
        draws = torch.stack([
            torch.randn(x.shape[1:], generator=streams[i], device=x.device, dtype=x.dtype) for i in b])
        b = torch.tensor(b, device=x.device)
        grad, _, _ = input_gradient(model, x[b] + _per_row(sigma[b], x) * draws, resolved[b])
        gradient_sum.index_add_(0, b, grad)
    return Attribution(gradient_sum / samples, logits, resolved)


# ---------------------------------------------------------------------------
# Grad-CAM
# ---------------------------------------------------------------------------


#: Largest ratio between the vertical and the horizontal downsampling of a [C, H, W] map relative to the input.
SPATIAL_STRIDE_RATIO = 1.5


def is_channels_first_map(shape, input_size) -> bool:
    """Whether a per-sample ``shape`` of three dimensions reads as ``[C, H, W]`` over an input of ``input_size``
    ``(H, W)``: a feature map downsamples both axes about alike and is no larger than the input.

    Token and channels-last activations are three-dimensional too (ConvNeXt's and Swin's ``[H, W, C]`` MLP
    activations, MaxViT's ``[windows, tokens, C]``), and read as ``[C, H, W]`` they give a map of stripes.
    """
    if len(shape) != 3 or min(shape) < 1:
        return False
    height, width = shape[1], shape[2]
    stride_h, stride_w = input_size[0] / height, input_size[1] / width
    return min(stride_h, stride_w) >= 1 and max(stride_h, stride_w) / min(stride_h, stride_w) <= SPATIAL_STRIDE_RATIO


def _is_spatial(site, input_size) -> bool:
    # [C, H, W] per sample (a folded call's is [k, T, C])
    return site.batch == PER_SAMPLE and is_channels_first_map(site.shape, input_size)


def capture_layer(model, x: torch.Tensor, layer: str) -> tuple:
    """Forward ``x`` keeping one layer's output; returns ``(CapturedOutput, logits)``.

    ``layer``: ``auto`` (the output of the last activation call with a
    ``[C, H, W]`` output: ResNet's ``layer4``, EfficientNet's head activation), a
    module path from ``named_modules()`` called once per forward, or an
    activation site name (``layer4.1.relu#2``) for one call of a reused module.
    """
    if layer == "auto":
        # the last [C, H, W] map; a [C, 1, 1] one (a squeeze-excitation gate) only where no larger map exists
        spread, pooled = CapturedOutput(), CapturedOutput()
        size = tuple(x.shape[-2:])

        def keep_maps(call):
            out = call.run()
            if _is_spatial(call.site, size):
                into = spread if call.site.shape[1] * call.site.shape[2] > 1 else pooled
                into.keep(out, f"activation site {call.site.name!r}")
            return out

        with instrument(model, keep_maps, inputs=x):
            logits = model(x)
        captured = spread if spread.captured else pooled
        if not captured.captured:
            raise InvalidOption("grad_cam found no activation with a [C, H, W] output in this model (a "
                                "transformer's or a channels-last block's are [tokens, C] or [H, W, C]); name a "
                                "layer whose output is [B, C, H, W] with the 'layer' option", code="invalid_layer")
        return captured, logits
    if layer in dict(model.named_modules()):
        try:
            with capture_module_output(model, layer) as captured:
                logits = model(x)
        except UncapturableOutputError as err:
            raise InvalidOption(str(err), code="invalid_layer") from None
        return captured, logits
    captured = CapturedOutput()
    with instrument(model, capture_site_output(lambda site: site.name == layer, captured), inputs=x) as recorder:
        logits = model(x)
    if not captured.captured:
        last = ", ".join(site.name for site in recorder.layout.sites[-3:])
        raise InvalidOption(f"layer {layer!r} is neither a module of this model nor one of its activation sites "
                            f"(the last sites are {last})", code="invalid_layer")
    return captured, logits


@register_method("grad_cam", options={
    "layer": OptionSpec(str, "auto", help="auto (last [C, H, W] activation), a module path, or an activation site"),
})
def grad_cam(model, x, targets, *, layer: str = "auto") -> Attribution:
    """Grad-CAM: a layer's channels weighted by their mean gradient, rectified, upsampled (Selvaraju et al. 2017).

    ``relu(Σ_c mean_hw(∂logit_c/∂A_c) · A_c)`` upsampled bilinearly
    (``align_corners=False``) to the input's size; maps are ``[B, 1, H, W]`` and
    non-negative.
    """
    x = x.detach().requires_grad_(True)  # parameters are frozen: the graph to the layer needs a leaf
    captured, logits = capture_layer(model, x, layer)
    try:
        activation = captured.tensor
    except UncapturableOutputError as err:
        raise InvalidOption(f"grad_cam: {err}; name another layer with the 'layer' option",
                            code="invalid_layer") from None
    if activation.dim() != 4 or not is_channels_first_map(tuple(activation.shape[1:]), tuple(x.shape[-2:])):
        raise InvalidOption(f"grad_cam needs a [B, C, H, W] layer output; {captured.source} gives "
                            f"{tuple(activation.shape)}" + (", which reads as [B, H, W, C] or tokens"
                                                            if activation.dim() == 4 else ""), code="invalid_layer")
    resolved = resolve_targets(logits.detach(), targets)
    (grad,) = torch.autograd.grad(target_sum(logits, resolved), activation)
    channel_weights = grad.mean(dim=(2, 3), keepdim=True)
    cam = (channel_weights * activation).sum(dim=1, keepdim=True).clamp(min=0)
    maps = F.interpolate(cam.detach(), size=tuple(x.shape[-2:]), mode="bilinear", align_corners=False)
    return Attribution(maps, logits.detach(), resolved)


# ---------------------------------------------------------------------------
# Guided backprop
# ---------------------------------------------------------------------------


class _RectifyGradient(torch.autograd.Function):
    """Identity in the forward; in the backward only the positive part of the gradient passes."""

    @staticmethod
    def forward(ctx, a):
        return alias(a)

    @staticmethod
    def backward(ctx, grad):
        return grad.clamp(min=0)


def rectify_site_gradient(call: SiteCall) -> torch.Tensor:
    """Site transform: the activation's own input gradient, with its negative part removed.

    The rectifier sits *before* the activation, so it rectifies what the
    activation's backward produced: ``relu(f'(z) · g)``. Non-piecewise-linear
    sites (SiLU, GELU, ...) keep their plain gradient, as in Captum.
    """
    if not call.site.piecewise_linear:
        return call.run()
    return call.run_on(_RectifyGradient.apply(call.input))


@register_method("guided_backprop")
def guided_backprop(model, x, targets) -> Attribution:
    """Guided backprop: the input gradient with every ReLU-family site passing back only positive gradients.

    Springenberg et al. 2015, as Captum computes it: at each site the gradient
    with respect to the activation's input is ``relu(f'(z) · g)`` for upstream
    gradient ``g``. For ReLU that is "positive gradients where the input was
    positive". For ReLU6 (and hardtanh) ``f'(z)`` is 1 only on the linear piece
    ``0 < z < 6``, so a saturated unit (``z ≥ 6``) passes nothing back, exactly as
    in the plain gradient: guided backprop only adds the sign restriction, it
    never opens a path the forward pass closed. Captum's own ``GuidedBackprop``
    rectifies ``nn.ReLU`` modules only, so on a ReLU6 network such as
    EfficientNet-Lite0 it silently returns the plain gradient; its rule applied to
    ReLU6 modules is what this computes (see ``tests/engine/test_captum_crosscheck.py``).
    Leaky ReLU and PReLU sites are rectified the same way.
    """
    with instrument(model, rectify_site_gradient, name_sites=False, inputs=x):
        grad, logits, resolved = input_gradient(model, x, targets)
    return Attribution(grad, logits, resolved)
