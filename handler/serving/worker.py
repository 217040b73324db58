"""What one TorchServe worker runs on: its device and its torch threads (model-config.yaml's ``pathway`` section)."""

from __future__ import annotations

import logging
import os

import torch

logger = logging.getLogger(__name__)


def worker_threads(section: dict, config: dict) -> tuple:
    """``(intra-op, inter-op)`` torch threads of one worker, from ``pathway.torch_threads`` and
    ``pathway.torch_interop_threads`` of model-config.yaml; ``"auto"``: the CPU cores shared out among the
    model's workers (``maxWorkers``), at least one each, and one inter-op thread.

    Why: a worker runs one batch at a time and an eager forward has no independent ops to run side by side,
    so inter-op threads only add idle pools; and workers whose OpenMP threads outnumber the cores stall at
    every parallel region's barrier (benchmarks/speed/README.md, "Workers and threads").
    """
    workers = max(1, int(config.get("maxWorkers") or config.get("minWorkers") or 1))
    intra = section.get("torch_threads", "auto")
    inter = section.get("torch_interop_threads", "auto")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    intra = max(1, cores // workers) if intra in (None, "auto") else int(intra)
    inter = 1 if inter in (None, "auto") else int(inter)
    if intra < 1 or inter < 1:
        raise ValueError(f"torch threads must be at least 1 (pathway.torch_threads {intra}, "
                         f"pathway.torch_interop_threads {inter})")
    return intra, inter


def choose_device(gpu_id, preference: str = "auto") -> torch.device:
    """The worker's GPU when TorchServe assigned one and CUDA works, else the CPU."""
    if preference == "cpu" or gpu_id is None or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(f"cuda:{int(gpu_id)}")


def apply_worker_threads(intra: int, inter: int) -> None:
    torch.set_num_threads(intra)
    try:
        torch.set_num_interop_threads(inter)
    except RuntimeError:  # only before the first inter-op parallel work of the process
        logger.warning("torch inter-op threads already fixed at %d", torch.get_num_interop_threads())
