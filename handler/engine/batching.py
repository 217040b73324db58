"""How many samples one pass may hold: a memory budget, per-sample estimates, and splitting after an out-of-memory.

An explanation's memory grows linearly with the batch: every activation site
keeps its activations for the backward, and the pathway adds a ``[B, N]`` score
buffer and a ``[B, N]`` bool mask (``N`` neurons per sample, 6.2 M for
EfficientNet-Lite0). The :class:`BatchPlanner` turns a :class:`MemoryBudget`
into a batch size per (method, input shape): from an estimate of
:data:`DEFAULT_BYTES_PER_NEURON` bytes per neuron and sample at first, from the
measured peak on CUDA after each pass, and from what failed after an
out-of-memory error. The :class:`~handler.engine.explainer.Explainer` splits
batches accordingly, and retries a batch that ran out of memory in halves, so
an out-of-memory degrades to smaller batches instead of failing the requests.
"""

from __future__ import annotations

import gc
import math
import os
import re
import threading
from dataclasses import dataclass
from typing import Optional, Union

import torch

#: Share of the free GPU memory (``cudaMemGetInfo`` plus what torch's cache holds unused) a pass may use.
DEFAULT_CUDA_FRACTION = 0.8
#: Share of the available RAM (``MemAvailable``) a pass may use on the CPU; TorchServe may run several workers.
DEFAULT_CPU_FRACTION = 0.25
#: Peak bytes per neuron and sample assumed before anything is measured: above what the pathway gradient
#: and the vanilla gradient were measured to need (benchmarks/speed/README.md), so a first batch fits.
DEFAULT_BYTES_PER_NEURON = 24

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


@dataclass(frozen=True)
class MemoryBudget:
    """What one explanation pass may use: a size in bytes, or a fraction of what the device has free.

    ``MemoryBudget()`` is the default: :data:`DEFAULT_CUDA_FRACTION` of the free GPU
    memory, or :data:`DEFAULT_CPU_FRACTION` of the available RAM, read at each call.
    ``max_batch`` caps the batch whatever the memory says.
    """

    bytes: Optional[int] = None
    fraction: Optional[float] = None
    max_batch: Optional[int] = None

    def __post_init__(self):
        if self.bytes is not None and self.bytes <= 0:
            raise ValueError(f"memory budget must be positive, got {self.bytes} bytes")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"memory budget fraction must be in (0, 1], got {self.fraction}")
        if self.max_batch is not None and self.max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {self.max_batch}")

    @classmethod
    def parse(cls, value: Union["MemoryBudget", int, float, str, None], max_batch: Optional[int] = None
              ) -> "MemoryBudget":
        """From configuration: ``None`` (the default), bytes (``4_000_000_000``), ``"4GiB"``, ``"512 MB"``, ``"60%"``."""
        if isinstance(value, MemoryBudget):
            return value if max_batch is None else MemoryBudget(value.bytes, value.fraction, max_batch)
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "auto")):
            return cls(max_batch=max_batch)
        if isinstance(value, bool):
            raise ValueError(f"memory budget must be a size or a percentage, not {value!r}")
        if isinstance(value, (int, float)):
            return cls(bytes=int(value), max_batch=max_batch)
        text = str(value).strip()
        if text.endswith("%"):
            return cls(fraction=float(text[:-1]) / 100.0, max_batch=max_batch)
        match = _SIZE.match(text)
        if not match or (match.group(2) or "").lower() not in _UNITS:
            raise ValueError(f"memory budget must be bytes, a size such as '4GiB', or a percentage, not {value!r}")
        return cls(bytes=int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()]), max_batch=max_batch)

    def available(self, device: torch.device) -> int:
        """Bytes a pass may use on ``device`` now."""
        if self.bytes is not None:
            return self.bytes
        if device.type == "cuda":
            fraction = DEFAULT_CUDA_FRACTION if self.fraction is None else self.fraction
            free, _total = torch.cuda.mem_get_info(device)
            cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            return int(fraction * (free + cached))
        fraction = DEFAULT_CPU_FRACTION if self.fraction is None else self.fraction
        return int(fraction * available_ram())


def available_ram() -> int:
    """``MemAvailable`` from ``/proc/meminfo`` (Linux); elsewhere the physical memory size."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


class BatchPlanner:
    """Batch sizes per (method, input shape) from a :class:`MemoryBudget`, learning from measurements and failures.

    Thread-safe: TorchServe may call one explainer from several threads.
    """

    def __init__(self, budget: MemoryBudget, device: torch.device):
        self.budget = budget
        self.device = device
        self._bytes_per_sample: dict = {}  # key -> measured peak bytes per sample (CUDA)
        self._ceiling: dict = {}  # key -> largest batch that may be tried (after an out-of-memory)
        self._lock = threading.Lock()

    def estimate(self, key, neurons_per_sample: int) -> int:
        """Peak bytes one sample is expected to need."""
        with self._lock:
            measured = self._bytes_per_sample.get(key)
        return measured if measured is not None else DEFAULT_BYTES_PER_NEURON * max(1, neurons_per_sample)

    def batch_size(self, key, neurons_per_sample: int, wanted: int) -> int:
        """How many of ``wanted`` samples to run together (at least one)."""
        size = max(1, self.budget.available(self.device) // self.estimate(key, neurons_per_sample))
        with self._lock:
            ceiling = self._ceiling.get(key)
        for cap in (ceiling, self.budget.max_batch):
            if cap is not None:
                size = min(size, cap)
        return max(1, min(size, wanted))

    def observe(self, key, batch: int, peak_bytes: int) -> None:
        """A pass of ``batch`` samples peaked at ``peak_bytes`` above what was allocated before it."""
        if batch < 1 or peak_bytes <= 0:
            return
        per_sample = math.ceil(peak_bytes / batch)
        with self._lock:
            previous = self._bytes_per_sample.get(key, 0)
            self._bytes_per_sample[key] = max(previous, per_sample)

    def out_of_memory(self, key, batch: int) -> int:
        """A pass of ``batch`` samples ran out of memory: the size to retry with (and never exceed again)."""
        smaller = max(1, batch // 2)
        with self._lock:
            self._ceiling[key] = min(self._ceiling.get(key, smaller), smaller)
        return smaller

    def ceiling(self, key) -> Optional[int]:
        """The learned largest batch for ``key`` (None: nothing has failed)."""
        with self._lock:
            return self._ceiling.get(key)


class PeakMemory:
    """Peak device memory of the passes inside the block, above what was allocated at its start (CUDA only).

    Resets CUDA's peak-memory statistics of the device at the start of the block.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, kind, _value, _traceback) -> None:
        if self.device.type == "cuda" and kind is None:
            self.peak = torch.cuda.max_memory_allocated(self.device) - self._start


def release_cached_memory(device: torch.device) -> None:
    """Give memory back after a failed pass (the failure's tensors are garbage once its traceback is gone), so
    the smaller retry starts from a clean cache."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def is_out_of_memory(err: BaseException) -> bool:
    """CUDA or host allocation failures: torch raises ``RuntimeError`` ("can't allocate memory") for the latter."""
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(err).lower()
    return "out of memory" in text or "can't allocate memory" in text
