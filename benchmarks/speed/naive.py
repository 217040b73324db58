"""A naive, per-image implementation of the method of docs/methods.md, written only to compare speeds with the engine.

What a first implementation (and the authors' code) looks like: one image at a
time, module forward hooks that capture every activation module's output
(activations called through ``F.relu`` are invisible to it), the contribution
scores copied to the host and the threshold taken there with NumPy, one float
mask per site sent back to the device, and a second hooked pass that
multiplies each activation output by its mask. It selects exactly the same
neurons as the engine (same scores, same order statistic, same ties rule), so
its maps match the engine's (``tests/benchmarks/test_benchmark_naive.py``); only the
speed differs.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import nn

ACTIVATION_MODULES = (nn.ReLU, nn.ReLU6)


def naive_pathway_gradient(model: nn.Module, x: torch.Tensor, targets: Sequence[int],
                           sparsity: float = 0.7) -> torch.Tensor:
    """Pathway gradient ``[B, C, H, W]`` of each image for its target (``-1``: the predicted class), one by one."""
    maps = [_one_image(model, x[b:b + 1], int(targets[b]), sparsity) for b in range(x.shape[0])]
    return torch.cat(maps)


def _one_image(model: nn.Module, x: torch.Tensor, target: int, sparsity: float) -> torch.Tensor:
    activations: list = []
    hooks = [m.register_forward_hook(lambda _m, _i, out: activations.append(out))
             for m in model.modules() if isinstance(m, ACTIVATION_MODULES)]
    try:
        logits = model(x.detach().clone().requires_grad_(True))  # parameters are frozen: the graph starts at x
        if target < 0:
            target = int(logits[0].argmax())
        grads = torch.autograd.grad(logits[0, target], activations, allow_unused=True)
    finally:
        for h in hooks:
            h.remove()
    scores = [(a * g).abs().detach().cpu().numpy().ravel() if g is not None else np.zeros(a.numel(), np.float32)
              for a, g in zip(activations, grads)]
    shapes = [a.shape for a in activations]
    del activations, grads, logits
    flat = np.concatenate(scores)
    k = min(flat.size, math.ceil(sparsity * flat.size - 1e-9))  # the engine's removal count
    tau = np.partition(flat, k - 1)[k - 1] if k > 0 else -np.inf
    masks = iter([torch.from_numpy((s > tau).astype(np.float32)).reshape(shape).to(x.device)
                  for s, shape in zip(scores, shapes)])
    hooks = [m.register_forward_hook(lambda _m, _i, out: out * next(masks))
             for m in model.modules() if isinstance(m, ACTIVATION_MODULES)]
    try:
        xg = x.detach().clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(model(xg)[0, target], xg)
    finally:
        for h in hooks:
            h.remove()
    return grad
