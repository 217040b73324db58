"""Shared benchmark plumbing: machine description, timing, result files."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable

import torch


def machine() -> dict:
    info = {
        "hostname_kind": os.environ.get("BENCH_MACHINE", "dev-vm"),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
        info["cuda"] = torch.version.cuda
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, *, warmup: int = 2, repeat: int = 5,
              min_seconds: float = 0.0) -> dict:
    """Median and spread of wall-clock seconds per call, after warm-up, synchronising the device."""
    for _ in range(warmup):
        fn()
    sync(device)
    samples = []
    start_all = time.perf_counter()
    while len(samples) < repeat or (time.perf_counter() - start_all) < min_seconds:
        start = time.perf_counter()
        fn()
        sync(device)
        samples.append(time.perf_counter() - start)
    return {"median_s": statistics.median(samples), "min_s": min(samples), "max_s": max(samples),
            "runs": len(samples)}


def write_results(directory: Path, stem: str, payload: dict, markdown: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{stem}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (directory / f"{stem}.md").write_text(markdown)
    print(markdown)


# ---------------------------------------------------------------------------
# Peak memory of one call: process RSS on the CPU, allocated memory on CUDA.
# ---------------------------------------------------------------------------


class PeakMemory:
    """Peak memory a block adds above what was in use when it started, in bytes (``None`` if unmeasurable).

    CPU: the process's peak resident set (``VmHWM``), reset at the start of the block through
    ``/proc/self/clear_refs`` after returning freed heap pages to the system (``malloc_trim``), so it
    includes everything the block touched (tensors, allocator slack, NumPy copies). CUDA: CUDA's peak
    allocated memory (``torch.cuda.max_memory_allocated``), reset at the start of the block.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.bytes = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        else:
            _trim_heap()
            self._start = _status_bytes("VmRSS") if _reset_peak_rss() else None
        return self

    def __exit__(self, kind, _value, _traceback) -> None:
        if kind is not None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        elif self._start is not None:
            peak = _status_bytes("VmHWM")
            self.bytes = None if peak is None else max(0, peak - self._start)


def _status_bytes(field: str):
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _trim_heap() -> None:
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
