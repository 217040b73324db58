"""METHOD.md §1–2 written independently of the engine: module forward hooks, a sort-based quantile, max-|·|.

Shared by the tests that check the engine against it (the embedded default model on real photos, and
every ReLU-only model of the model-zoo conformance suite).
"""

import numpy as np
import torch
from torch import nn


def relu_module_calls(model: nn.Module, x: torch.Tensor, modules=(nn.ReLU, nn.ReLU6)) -> int:
    """How many times ``modules`` are called in one forward of ``x`` (a reused module counts once per call)."""
    calls = [0]
    hooks = [m.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for m in model.modules()
             if isinstance(m, modules)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return calls[0]


def reference_pathway_gradient(model: nn.Module, x: torch.Tensor, target: int, sparsity: float,
                               modules=(nn.ReLU6,)):
    """One sample's pathway gradient map (``[H, W]``, max-|·| over channels) and realised sparsity.

    Scores every output neuron of every call of ``modules`` by ``|a ⊙ ∂logit/∂a|``, removes those at or
    below the ``ceil(p·N)``-th smallest score, and differentiates the target logit of the network whose
    calls are multiplied by those masks, in call order.
    """
    acts = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: acts.append(out)) for m in model.modules()
             if isinstance(m, modules)]
    try:
        with torch.enable_grad():
            logits = model(x.clone().requires_grad_(True))
            grads = torch.autograd.grad(logits[0, target], acts, allow_unused=True)
        grads = [torch.zeros_like(a) if g is None else g for a, g in zip(acts, grads)]
        contrib = torch.cat([(a * g).abs().flatten() for a, g in zip(acts, grads)])
        ordered = contrib.sort().values
        tau = ordered[int(np.ceil(sparsity * ordered.numel())) - 1]
        masks = [((a * g).abs() > tau).to(a.dtype) for a, g in zip(acts, grads)]
    finally:
        for h in hooks:
            h.remove()
    it = iter(masks)
    hooks = [m.register_forward_hook(lambda _m, _i, out: out * next(it)) for m in model.modules()
             if isinstance(m, modules)]
    try:
        xg = x.clone().requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(model(xg)[0, target], xg)
    finally:
        for h in hooks:
            h.remove()
    idx = grad.abs().argmax(dim=1, keepdim=True)
    realised = 1 - torch.cat([m.flatten() for m in masks]).mean().item()
    return grad.gather(1, idx)[0, 0].numpy(), realised
