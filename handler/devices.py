"""Which device to run on, as the CLIs' ``--device`` flag and TorchServe's ``gpu_id`` say."""

from __future__ import annotations

import torch

from .errors import UsageError


def parse_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; a usage error names what is wrong."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda was asked for, but CUDA is not available on this machine")
    return device


def choose_device(gpu_id, preference: str = "auto") -> torch.device:
    """The worker's GPU when TorchServe assigned one and CUDA works, else the CPU."""
    if preference == "cpu" or gpu_id is None or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(f"cuda:{int(gpu_id)}")
