"""The per-sample threshold: which neurons a sparsity removes, exactly, on the host and on a device.

:func:`keep_above_quantile` removes, per sample, every neuron whose score is at
most the ``p``-quantile of that sample's scores (one global threshold over all
sites, Khakzar et al. 2021). On a GPU everything stays on the device: the
threshold is a ``topk`` per row, launched without reading anything back to the
host (see :func:`kth_smallest_on_device`). On the CPU, where there is no device
to wait for, an exact radix-style select over a sampled bracket is faster
(:func:`keep_above_quantile_host`). ``torch.quantile`` is not used: it fails
above 2**24 elements.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np
import torch


def removal_count(sparsity: float, total: int) -> int:
    """How many of ``total`` neurons the ``sparsity``-quantile threshold removes at least."""
    return min(total, math.ceil(sparsity * total - 1e-9))


def keep_above_quantile(scores: torch.Tensor, sparsity: Sequence[float]) -> torch.Tensor:
    """Keep, per row, the neurons scoring strictly above the row's ``p``-quantile.

    Ties at the threshold are removed too (dead neurons all score 0), so the
    realised sparsity can exceed the requested one; it never falls below it.
    On a GPU the whole selection is queued without synchronising with the host
    (:func:`kth_smallest_on_device`); on the CPU the threshold and the mask come
    out of the same few NumPy passes (:func:`keep_above_quantile_host`).
    """
    batch, total = scores.shape
    counts = [removal_count(float(p), total) for p in sparsity]
    if all(k == 0 for k in counts):
        return torch.ones_like(scores, dtype=torch.bool)
    if scores.device.type == "cpu":
        keep = torch.empty(scores.shape, dtype=torch.bool)
        keep_above_quantile_host(scores.detach().numpy(), counts, keep.numpy())
        return keep
    keep = scores > kth_smallest_on_device(scores, counts)[:, None]
    for b, k in enumerate(counts):
        if k == 0:  # nothing removed, NaN scores included
            keep[b] = True
    return keep


def kth_smallest(scores: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Per row, the ``k``-th smallest value (1-based; rows with ``k = 0`` get ``-inf``), exactly.

    On the CPU, where nothing waits on a device, :func:`kth_smallest_host`;
    anywhere else :func:`kth_smallest_on_device`, which never synchronises.
    """
    ks = [int(k) for k in ks]
    if scores.device.type != "cpu":
        return kth_smallest_on_device(scores, ks)
    return torch.tensor(kth_smallest_host(scores.detach().numpy(), ks), dtype=scores.dtype)


#: Size of the systematic sample that brackets the k-th value on the host.
HOST_SAMPLE = 1 << 17
#: Half-width of the bracket in standard deviations of the k-th value's rank in the sample.
HOST_BRACKET_SIGMAS = 4.0


def kth_smallest_host(values: np.ndarray, ks: Sequence[int]) -> list:
    """Per row of a 2-D float array, the exact ``k``-th smallest (1-based; ``-inf`` where ``k = 0``)."""
    return _select_host(values, ks, None)


def keep_above_quantile_host(values: np.ndarray, ks: Sequence[int], keep: np.ndarray) -> list:
    """Fill ``keep`` (bool, shaped like ``values``) with ``values > the k-th smallest`` per row; returns the thresholds.

    Rows with ``k = 0`` keep everything.
    """
    return _select_host(values, ks, keep)


def _select_host(values: np.ndarray, ks: Sequence[int], keep: Optional[np.ndarray]) -> list:
    """Exact per-row selection in a few vectorised host passes (the CPU path; it reads counts as it goes).

    ``kthvalue`` is a single-threaded quickselect, several times slower over
    millions of neurons (benchmarks/speed/README.md, "Figures the code relies
    on"). Instead, a systematic sample of :data:`HOST_SAMPLE` values of the
    row brackets its ``k``-th value between two order statistics of the sample,
    (``lo``, ``hi``]. One comparison pass per end counts the values at or below
    it: the counts prove that the bracket holds the ``k``-th value, the few
    values inside it are partitioned exactly, and the mask is ``values > hi``
    plus the values inside that beat the threshold, with no further pass. Ties
    at ``lo`` (dead neurons all score 0) cost one more count; if the counts show
    that the bracket missed, a full partition answers. The passes run on
    ``torch.get_num_threads()`` threads over rows and chunks (NumPy releases the GIL).
    """
    rows, n = values.shape
    out = [float("-inf")] * rows
    todo = [(b, int(k)) for b, k in enumerate(ks)]
    for b, k in todo:
        if not 0 <= k <= n:
            raise ValueError(f"k = {k} is outside 0..{n}")
        if k == 0 and keep is not None:
            keep[b] = True
    todo = [(b, k) for b, k in todo if k > 0]
    if not todo:
        return out
    if n <= 4 * HOST_SAMPLE:
        for b, k in todo:
            out[b] = _exact_host(values[b], k, None if keep is None else keep[b])
        return out
    pool = _host_pool()
    run = pool.map if pool is not None else map
    brackets = dict(zip([b for b, _ in todo], run(lambda bk: _sample_bracket(values[bk[0]], bk[1]), todo)))
    pieces = max(1, -(-torch.get_num_threads() // len(todo)))
    bounds = [(i * n // pieces, (i + 1) * n // pieces) for i in range(pieces)]
    tasks = [(b, start, stop) for b, _ in todo for start, stop in bounds]

    def count(task):
        b, start, stop = task
        return _count_bracket(values[b, start:stop], *brackets[b], None if keep is None else keep[b, start:stop])

    counted = list(run(count, tasks))
    for b, k in todo:
        parts = [(t[1], c) for t, c in zip(tasks, counted) if t[0] == b]
        lo, hi = brackets[b]
        below = sum(c[0] for _, c in parts)
        row_keep = None if keep is None else keep[b]
        if lo is not None and k <= below:  # at most lo: it is lo itself unless k values lie below lo
            if int(np.count_nonzero(values[b] < lo)) < k:
                out[b] = float(lo)
                if row_keep is not None:
                    np.greater(values[b], lo, out=row_keep)
                continue
        elif k <= sum(c[1] for _, c in parts):
            candidates = np.concatenate([c[3] for _, c in parts])
            j = k - below - 1
            tau = np.partition(candidates, j)[j]
            out[b] = float(tau)
            if row_keep is not None:
                for start, c in parts:
                    row_keep[start + c[2][c[3] > tau]] = True
            continue
        out[b] = _exact_host(values[b], k, row_keep)  # the sample misled the bracket
    return out


def _exact_host(row: np.ndarray, k: int, keep: Optional[np.ndarray]) -> float:
    tau = np.partition(row, k - 1)[k - 1]
    if keep is not None:
        np.greater(row, tau, out=keep)
    return float(tau)


def _sample_bracket(row: np.ndarray, k: int) -> tuple:
    """Two values of a systematic sample of ``row`` that should enclose its ``k``-th smallest (``None``: no bound)."""
    n = row.size
    sample = row[:: (n // HOST_SAMPLE) | 1]
    m = sample.size
    q = k / n
    margin = HOST_BRACKET_SIGMAS * math.sqrt(m * q * (1.0 - q)) + 8.0
    i_lo, i_hi = int(q * m - margin), int(q * m + margin)
    ranks = [i for i in (i_lo, i_hi) if 0 <= i < m]
    ordered = np.partition(sample, ranks) if ranks else sample
    return (ordered[i_lo] if i_lo >= 0 else None), (ordered[i_hi] if i_hi < m else None)


def _count_bracket(chunk: np.ndarray, lo, hi, keep: Optional[np.ndarray]) -> tuple:
    """One chunk's ``(#values <= lo, #values <= hi, positions and values in (lo, hi])``; sets ``keep = values > hi``.

    ``None`` bounds are open.
    """
    at_or_below_hi = (chunk <= hi) if hi is not None else ~np.isnan(chunk)
    if keep is not None:
        if hi is None:
            keep.fill(False)
        else:
            np.logical_not(at_or_below_hi, out=keep)
    at_hi = int(np.count_nonzero(at_or_below_hi))
    below = 0
    if lo is not None:
        at_or_below_lo = chunk <= lo
        below = int(np.count_nonzero(at_or_below_lo))
        at_or_below_hi ^= at_or_below_lo  # now: lo < value <= hi
    inside = np.flatnonzero(at_or_below_hi)
    return below, at_hi, inside, chunk[inside]


_POOL: Optional[ThreadPoolExecutor] = None


def _host_pool() -> Optional[ThreadPoolExecutor]:
    """Threads for the host threshold's NumPy passes, as many as torch's intra-op threads (None: one)."""
    global _POOL
    threads = torch.get_num_threads()
    if threads <= 1:
        return None
    if _POOL is None or _POOL._max_workers != threads:
        _POOL = ThreadPoolExecutor(threads, thread_name_prefix="pathway-threshold")
    return _POOL


#: Upper bound on the temporary ``topk`` output of :func:`kth_smallest_on_device` (values and indices), in
#: bytes: rows are processed in groups that stay below it.
TOPK_WORKSPACE_BYTES = 256 * 2**20


def kth_smallest_on_device(scores: torch.Tensor, ks: Sequence[int]) -> torch.Tensor:
    """Per row, the ``k``-th smallest value, with no host synchronisation (the GPU path).

    Only host integers (``ks``, shapes) steer the work; nothing is read back
    from the device (no ``.item()``, ``int(tensor)``, ``nonzero``,
    ``masked_select`` or ``bincount``, which all wait for the GPU). The ``k``-th
    smallest of ``N`` values is the largest of the ``k`` smallest, or the
    smallest of the ``N - k + 1`` largest: a multi-block radix-select ``topk``
    over whichever side is shorter (``kthvalue`` would give each row a single
    thread block). Rows sharing ``k`` run together in groups whose ``topk``
    output stays below :data:`TOPK_WORKSPACE_BYTES`. Exact, ties included.
    """
    batch, total = scores.shape
    out = torch.full((batch,), float("-inf"), device=scores.device, dtype=scores.dtype)
    by_k: dict = {}
    for b, k in enumerate(ks):
        k = int(k)
        if not 0 <= k <= total:
            raise ValueError(f"k = {k} is outside 0..{total}")
        if k > 0:
            by_k.setdefault(k, []).append(b)
    for k, rows in by_k.items():
        smallest = k <= total - k + 1
        width = k if smallest else total - k + 1
        per_row = width * (scores.element_size() + 8)
        group = max(1, TOPK_WORKSPACE_BYTES // per_row)
        for runs in _contiguous_runs(rows, group):
            first, last = runs
            picked = scores[first:last].topk(width, dim=1, largest=not smallest, sorted=False).values
            out[first:last] = picked.amax(dim=1) if smallest else picked.amin(dim=1)
    return out


def _contiguous_runs(rows: list, limit: int):
    """``(start, stop)`` slices covering ``rows`` (sorted row indices), each contiguous and at most ``limit`` long."""
    start = prev = rows[0]
    for r in rows[1:]:
        if r != prev + 1 or r - start >= limit:
            yield start, prev + 1
            start = r
        prev = r
    yield start, prev + 1
