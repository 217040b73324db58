"""Pathways: per-sample binary masks over all neurons, how they are selected, and how a network runs along one.

A selection strategy scores every neuron of every activation site for one input
and target; :func:`keep_above_quantile` then removes, per sample, every neuron
whose score is at most the ``p``-quantile of that sample's scores (one global
threshold over all sites, Khakzar et al. 2021). On a GPU everything stays on the
device: the threshold is a ``topk`` per row, launched without reading anything
back to the host (see :func:`kth_smallest_on_device`). On the CPU, where there is
no device to wait for, an exact radix select is several times faster.
"""

from __future__ import annotations

import contextlib
import math
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .options import OptionSpec
from .registry import Registry
from .sites import Site, SiteCall, SiteLayout, instrument


@dataclass
class Pathway:
    """The kept neurons of a batch, and what the selection pass learned on the way."""

    selection: str
    layout: SiteLayout
    keep: torch.Tensor  # [B, N] bool
    requested_sparsity: Sequence[float]
    targets: torch.Tensor  # [B] long: the class each sample's pathway was selected for
    logits: torch.Tensor  # [B, K] logits of the full network at the input
    channel_scores: Optional[list] = None  # per site [B, C]: each channel's summed neuron score
    alive: Optional[torch.Tensor] = None  # [B, N] bool: neuron non-zero in the full network
    details: list = field(default_factory=list)  # per sample: strategy-specific facts
    #: The selection cannot keep a dead neuron (it scores 0 and the threshold removes every score <= τ, τ >= 0),
    #: so ``alive`` need not be recorded to report ``kept_dead_neurons`` = 0.
    keeps_no_dead: bool = False

    @property
    def batch_size(self) -> int:
        return self.keep.shape[0]

    def realised_sparsity(self) -> torch.Tensor:
        return 1.0 - self.kept_per_site().sum(dim=1).double() / self.layout.total

    def kept_per_site(self) -> torch.Tensor:
        """``[B, sites]`` kept neurons of each site.

        On the CPU NumPy's ``count_nonzero`` on each contiguous row slice (torch's on strided
        ``[B, n]`` views, or a bool ``sum``, is 20x slower there); on a device ``count_nonzero``.
        """
        if self.keep.device.type == "cpu":
            keep = self.keep.numpy()
            return torch.tensor([[np.count_nonzero(keep[b, s.offset:s.offset + s.numel]) for s in self.layout]
                                 for b in range(self.batch_size)], dtype=torch.int64)
        return torch.stack([torch.count_nonzero(site.view(self.keep).flatten(1), dim=1) for site in self.layout], 1)

    def summaries(self, top_channels: int = 3) -> list:
        """One JSON-ready summary per sample; everything computed on the device, then one transfer per quantity."""
        kept_per_site = self.kept_per_site().cpu().tolist()
        dead_kept = None
        if self.alive is not None:
            dead_kept = torch.count_nonzero(self.keep & ~self.alive, dim=1).cpu().tolist()
        elif self.keeps_no_dead:
            dead_kept = [0] * self.batch_size
        channels = None
        if self.channel_scores is not None:
            picked = [scores.topk(min(top_channels, scores.shape[1]), dim=1).indices for scores in self.channel_scores]
            flat = torch.cat(picked, dim=1).cpu().tolist()
            widths = [p.shape[1] for p in picked]
            channels = []
            for row in flat:
                split, start = [], 0
                for w in widths:
                    split.append(row[start:start + w])
                    start += w
                channels.append(split)
        out = []
        for b in range(self.batch_size):
            kept_total = int(sum(kept_per_site[b]))
            sites, removed = [], []
            selectable = iter(enumerate(self.layout))
            for site in self.layout.sites:
                entry = {"name": site.name, "kind": site.kind, "call": site.batch, "shape": list(site.shape)}
                if not site.selectable:  # a table shared by the batch: not part of any pathway, always kept
                    entry.update(kept=0, total=0, selectable=False)
                    sites.append(entry)
                    continue
                i, _ = next(selectable)
                entry.update(kept=int(kept_per_site[b][i]), total=site.numel)
                if entry["kept"] == 0:
                    removed.append(site.name)
                if channels is not None:
                    entry["top_channels"] = channels[b][i]
                sites.append(entry)
            summary = {
                "selection": self.selection,
                "requested_sparsity": float(self.requested_sparsity[b]),
                "realised_sparsity": 1.0 - kept_total / self.layout.total,
                "kept_neurons": kept_total,
                "total_neurons": self.layout.total,
                "locally_linear": self.layout.locally_linear,
                "nonlinear_activations": self.layout.nonlinear_kinds,
            }
            if dead_kept is not None:
                summary["kept_dead_neurons"] = int(dead_kept[b])
            if self.details:
                summary.update(self.details[b])
            summary["removed_sites"] = removed  # sites of which the pathway keeps no neuron: every path through them is cut
            summary["sites"] = sites
            out.append(summary)
        return out


def resolve_targets(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Each sample's target class: the given index, or the predicted class where it is negative."""
    return torch.where(targets < 0, logits.argmax(dim=1), targets)


def target_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Σ_b logit[b, c_b]: one backward gives every sample's gradient (samples are independent in eval mode)."""
    return logits.gather(1, targets[:, None]).sum()


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

    ``kthvalue`` is a single-threaded quickselect, ~10x slower over millions of
    neurons. Instead, a systematic sample of :data:`HOST_SAMPLE` values of the
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


def channel_sums(layout: SiteLayout, scores: torch.Tensor) -> list:
    """Per site, each channel's summed score ``[B, C]`` (channels: dim 1 of images, last dim of tokens)."""
    return [site_channel_sums(site.view(scores)) for site in layout]


def site_channel_sums(view: torch.Tensor) -> torch.Tensor:
    """One site's ``[B, ...]`` scores summed per channel: ``[B, C]``."""
    if view.dim() == 4:
        return view.sum(dim=(2, 3))
    if view.dim() == 3:
        return view.sum(dim=1)
    return view.flatten(1).clone()


#: Activation kinds whose output *and* autograd derivative are zero where their input is zero (ReLU and
#: ReLU6 compute their backward from the output: ``grad * (0 < out < max)``). Zeroing a removed neuron's input
#: before such an activation removes it from the forward and the backward alike, with no mask in the graph.
ZERO_GRADIENT_AT_ZERO = frozenset({"relu", "relu6"})


def run_along(model: nn.Module, x: torch.Tensor, pathway: Pathway) -> torch.Tensor:
    """Forward ``x`` through ``model`` with every site's output multiplied by the pathway's fixed mask.

    Where the model called a ReLU or ReLU6 in place, the removed neurons' inputs
    are zeroed in place outside autograd and the activation runs as the model
    asked: the activation's own backward then gives them zero gradient, so the
    pass costs one multiplication per site and the backward nothing extra.
    Elsewhere the output is multiplied by the mask inside autograd.
    """
    if x.shape[0] != pathway.batch_size:
        raise ValueError(f"input batch {x.shape[0]} does not match the pathway's batch {pathway.batch_size}")
    keep = pathway.keep

    def mask(call: SiteCall) -> torch.Tensor:
        # as uint8: multiplying a float by a bool tensor first copies the whole mask to float (3x slower on the CPU)
        kept = call.site.view(keep).view(torch.uint8)
        if call.may_modify_input and call.site.kind in ZERO_GRADIENT_AT_ZERO:
            with torch.no_grad():
                call.input.mul_(kept)
            return call.run()
        return call.run() * kept

    with instrument(model, mask, expected=pathway.layout, inputs=x):
        return model(x)


# ---------------------------------------------------------------------------
# Selection strategies
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Selection:
    """A strategy: ``fn(model, x, targets, sparsity, **options) -> Pathway``; ``targets`` holds ``-1``
    where the predicted class is meant, ``sparsity`` one value per sample."""

    name: str
    fn: Callable[..., Pathway]
    summary: str
    options: Mapping[str, OptionSpec] = field(default_factory=dict)

    def __call__(self, model, x, targets, sparsity, **options) -> Pathway:
        return self.fn(model, x, targets, sparsity, **options)


SELECTIONS: Registry = Registry("pathway selection")


def register_selection(name: str, *, options: Optional[Mapping[str, OptionSpec]] = None):
    """Register a pathway selection strategy; ``options`` are what a request may set."""

    def decorate(fn):
        doc = (fn.__doc__ or "").strip().splitlines()
        SELECTIONS.register(name)(Selection(name, fn, doc[0] if doc else name, dict(options or {})))
        return fn
    return decorate


class _ContributionProbe(torch.autograd.Function):
    """Identity in the forward; in the backward, hands ``a`` and ``∂s/∂a`` of its site to a sink.

    Its second input is a scalar token shared by all probes: differentiating
    the target sum with respect to the token runs the backward exactly down to
    the first site, and no further.

    It returns a view of ``a`` (no copy), except at a site whose output the
    model modifies in place later (EfficientNetV2's ``result += input``):
    autograd forbids modifying a custom Function's view output in place, and
    the score needs ``a`` as the activation returned it, so there it returns a
    copy that the model may overwrite.
    """

    @staticmethod
    def forward(ctx, a, token, sink, site):
        ctx.save_for_backward(a)
        ctx.sink = sink
        ctx.site = site
        return a.clone() if site.overwritten else a.view_as(a)

    @staticmethod
    def backward(ctx, grad):
        (a,) = ctx.saved_tensors
        ctx.sink(ctx.site, a, grad)
        return grad, None, None, None


def score_neurons(
    model: nn.Module,
    x: torch.Tensor,
    targets: torch.Tensor,
    score: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None],
    *,
    record_alive: bool = False,
    on_scored: Optional[Callable[[Site, torch.Tensor], None]] = None,
    allocate: Optional[Callable[[int, int, torch.dtype, torch.device], torch.Tensor]] = None,
):
    """One forward and one partial backward; ``score(a, grad, out)`` writes each site's neuron scores into ``out``.

    ``on_scored(site, out)``, if given, sees each site's scores right after they
    are written (while they are still in cache). ``allocate(batch, neurons,
    dtype, device)``, if given, provides the ``[B, N]`` score buffer (default: a
    new tensor). The activations are released as the backward passes them: when
    this returns, only the scores remain.
    Returns ``(scores [B, N], layout, logits, resolved targets, alive or None)``.
    """
    token = torch.zeros((), device=x.device, dtype=x.dtype, requires_grad=True)
    buffer: dict = {}
    alive_parts: list = []
    reached: set = set()

    def sink(site: Site, a: torch.Tensor, grad: torch.Tensor) -> None:
        out = site.view(buffer["scores"])
        score(a, grad, out)
        if on_scored is not None:
            on_scored(site, out)
        reached.add(site.index)

    def probe(call: SiteCall) -> torch.Tensor:
        out = call.run()
        if record_alive:
            alive_parts.append((out != 0).flatten(1))
        return _ContributionProbe.apply(out, token, sink, call.site)

    with instrument(model, probe, inputs=x) as recorder:
        logits = model(x.detach())
    layout = recorder.layout
    resolved = resolve_targets(logits.detach(), targets)
    buffer["scores"] = (allocate or _new_buffer)(x.shape[0], layout.total, x.dtype, x.device)
    torch.autograd.grad(target_sum(logits, resolved), token, allow_unused=True)
    for site in layout:
        if site.index not in reached:  # the target does not depend on this site: it contributes nothing
            site.view(buffer["scores"]).zero_()
            if on_scored is not None:
                on_scored(site, site.view(buffer["scores"]))
    alive = torch.cat(alive_parts, dim=1) if record_alive else None
    return buffer["scores"], layout, logits.detach(), resolved, alive


def _new_buffer(batch: int, total: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.empty(batch, total, device=device, dtype=dtype)


#: Largest ``[B, N]`` score buffer, in bytes, that a CPU thread keeps between calls (0: none). glibc hands
#: blocks above 32 MB back to the system when they are freed, so a fresh buffer page-faults in on every call
#: (~2.5 µs per 4 KiB page here: 15 ms for ResNet-50 at batch 1, 80 ms for EfficientNet-Lite0 at batch 8).
SCORE_WORKSPACE_BYTES = 512 * 2**20


class _ScoreWorkspace(threading.local):
    buffer: Optional[torch.Tensor] = None
    busy: bool = False


_WORKSPACE = _ScoreWorkspace()


@contextlib.contextmanager
def _score_workspace():
    """An ``allocate`` for :func:`score_neurons` that reuses this thread's CPU buffer, for the block's duration."""
    if _WORKSPACE.busy:
        yield None
        return

    def allocate(batch: int, total: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = batch * total
        if device.type != "cpu" or numel * dtype.itemsize > SCORE_WORKSPACE_BYTES:
            return _new_buffer(batch, total, dtype, device)
        held = _WORKSPACE.buffer
        if held is None or held.dtype != dtype or held.numel() < numel:
            _WORKSPACE.buffer = None
            held = _WORKSPACE.buffer = torch.empty(numel, dtype=dtype)
        return held[:numel].view(batch, total)

    _WORKSPACE.busy = True
    try:
        yield allocate
    finally:
        _WORKSPACE.busy = False


def _abs_contribution(a, grad, out):
    torch.mul(a, grad, out=out)
    out.abs_()


def _positive_contribution(a, grad, out):
    torch.mul(a, grad, out=out)
    out.clamp_(min=0)


@register_selection("contribution", options={
    "signed": OptionSpec(bool, False, help="keep only neurons that push the target logit up"),
})
def select_by_contribution(model, x, targets, sparsity, *, signed: bool = False,
                           record_alive: Optional[bool] = None) -> Pathway:
    """Keep the neurons with the largest first-order contribution ``|a ⊙ ∂logit_c/∂a|`` (NeuronMCT).

    ``signed=True`` scores ``max(a ⊙ ∂logit_c/∂a, 0)``: only neurons that push the
    target logit up can be kept.
    ``record_alive``: keep the full network's ``[B, N]`` alive mask on the pathway
    (default: only when a sample's sparsity is so close to 0 that nothing is removed). A dead
    neuron scores 0, and at sparsity > 0 the threshold τ >= 0 removes every score
    <= τ, so otherwise no kept neuron is dead, and the mask and its count (~70 ms,
    a quarter of a vanilla gradient, for EfficientNet-Lite0 at batch 8 on 2 CPU
    cores) are not needed to say so.
    """
    if record_alive is None:
        record_alive = any(float(p) <= 1e-9 for p in sparsity)  # removal_count is 0 only below this
    sums: dict = {}
    with _score_workspace() as allocate:  # the scores never leave this block: only the bool mask does
        scores, layout, logits, resolved, alive = score_neurons(
            model, x, targets, _positive_contribution if signed else _abs_contribution, record_alive=record_alive,
            on_scored=lambda site, out: sums.__setitem__(site.index, site_channel_sums(out)), allocate=allocate)
        keep = keep_above_quantile(scores, sparsity)
        del scores
    return Pathway(
        selection="contribution_signed" if signed else "contribution",
        layout=layout,
        keep=keep,
        requested_sparsity=list(sparsity),
        targets=resolved,
        logits=logits,
        channel_scores=[sums[site.index] for site in layout],
        alive=alive,
        keeps_no_dead=not record_alive,
    )
