"""Attribution methods: each turns a model, a batch and its targets into maps over the normalised input.

A method is registered under its name and called as
``method(model, x, targets, **options) -> Attribution``. Every method is batched
(one target per sample), runs on whatever device ``x`` lives on, and returns
the raw per-channel attribution ``[B, C, H, W]``; channel reduction and
normalisation are the caller's (see :mod:`.reduce`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import torch
from torch import nn

from .options import OptionSpec
from .pathways import SELECTIONS, Pathway, resolve_targets, run_along, target_sum
from .registry import Registry


@dataclass
class Attribution:
    maps: torch.Tensor  # [B, C, H, W], gradient-like, w.r.t. the normalised input
    logits: torch.Tensor  # [B, K] full network
    targets: torch.Tensor  # [B] resolved target classes
    pathway: Optional[Pathway] = None
    pathway_logits: Optional[torch.Tensor] = None  # [B, K] the pathway's own logits


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[..., Attribution]
    uses_pathway: bool
    summary: str
    options: Mapping[str, OptionSpec] = field(default_factory=dict)
    uses_normalisation: bool = False  # called with ``normalisation=`` (an InputNormalisation) by the Explainer
    zero_note: str = ""  # the response's note when this method's map is zero everywhere

    def __call__(self, model, x, targets, **options) -> Attribution:
        return self.fn(model, x, targets, **options)


METHODS: Registry = Registry("explanation method", "unknown_method")


def register_method(
    name: str,
    *,
    uses_pathway: bool = False,
    options: Optional[Mapping[str, OptionSpec]] = None,
    uses_normalisation: bool = False,
    zero_note: Optional[str] = None,
):
    """Register ``fn(model, x, targets, **options) -> Attribution``; ``options`` are what a request may set.

    ``uses_normalisation``: the method needs to know what the input looks like in
    pixel space (a black baseline) and accepts ``normalisation=InputNormalisation``.
    ``zero_note``: what a map that is zero everywhere means for this method (default: said in general). A
    pathway method's zero map is explained from its pathway instead (:func:`~.pathways.pathway_zero_note`).
    """
    if zero_note is None:
        zero_note = (f"the attribution is zero everywhere: {name} finds no input evidence for the target "
                     "(Grad-CAM is zero where every position of its layer weighs against it)")

    def decorate(fn):
        doc = (fn.__doc__ or "").strip().splitlines()
        METHODS.register(name)(Method(name, fn, uses_pathway, doc[0] if doc else name, dict(options or {}),
                                      uses_normalisation, zero_note))
        return fn
    return decorate


def input_gradient(model: nn.Module, x: torch.Tensor, targets: torch.Tensor):
    """``∂ logit[b, c_b] / ∂x`` for the whole batch in one backward; returns (grad, logits, resolved targets)."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    resolved = resolve_targets(logits.detach(), targets)
    (grad,) = torch.autograd.grad(target_sum(logits, resolved), x)
    return grad, logits.detach(), resolved


@register_method("gradient")
def vanilla_gradient(model, x, targets) -> Attribution:
    """Gradient of the target logit with respect to the normalised input."""
    grad, logits, resolved = input_gradient(model, x, targets)
    return Attribution(grad, logits, resolved)


@register_method("pathway_gradient", uses_pathway=True)
def pathway_gradient(
    model,
    x,
    targets,
    *,
    sparsity: Sequence[float],
    selection: str = "contribution",
    selection_options: Optional[dict] = None,
) -> Attribution:
    """Gradient of the target logit through the sample's critical pathway (Khakzar et al., CVPR 2021)."""
    pathway = SELECTIONS.get(selection)(model, x, targets, sparsity, **(selection_options or {}))
    grad, pathway_logits, _ = input_gradient(
        lambda inp: run_along(model, inp, pathway), x, pathway.targets)
    return Attribution(grad, pathway.logits, pathway.targets, pathway, pathway_logits)
