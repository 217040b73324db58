"""The per-sample threshold: exact on the host and on the device, and the device path never waits on the GPU."""

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from handler.engine import threshold
from handler.engine.threshold import keep_above_quantile, kth_smallest_host, kth_smallest_on_device, removal_count

# Calls that read device memory back to the host (or size their output by it): on CUDA each one waits for
# every queued kernel. The device threshold must make none of them.
SYNCHRONISING = {"__int__", "__float__", "__bool__", "__index__", "item", "tolist", "cpu", "numpy", "nonzero",
                 "argwhere", "masked_select", "bincount", "unique", "unique_consecutive", "repeat_interleave"}


class NoHostSync(TorchFunctionMode):
    """Fails on any call that would synchronise a CUDA device with the host; usable on CPU tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in SYNCHRONISING:
            raise AssertionError(f"{name} synchronises with the host")
        if name == "to" and any(str(a) == "cpu" for a in list(args[1:]) + list(kwargs.values())):
            raise AssertionError("a copy to the host")
        if name == "__getitem__" and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                         for i in (args[1] if isinstance(args[1], tuple) else (args[1],))):
            raise AssertionError("boolean indexing sizes its output by the data")
        return func(*args, **kwargs)


def scores_with_ties(rows=4, n=50_000, seed=0):
    """Neuron-score-like rows: a block of dead neurons at exactly 0, repeated values, a heavy tail."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(rows, n, generator=g).pow(4)
    scores[:, : n // 2] = 0
    scores[:, n // 2: n // 2 + 500] = 0.25
    return scores[:, torch.randperm(n, generator=g)]


def reference_kth(scores, ks):
    ordered = scores.sort(dim=1).values
    return [float("-inf") if k == 0 else ordered[b, k - 1].item() for b, k in enumerate(ks)]


@pytest.mark.parametrize("ks", [[1, 25_000, 25_001, 50_000], [0, 35_000, 0, 35_000], [40_000] * 4, [0, 0, 0, 0]])
def test_device_threshold_is_exact_and_never_synchronises(ks, monkeypatch):
    scores = scores_with_ties()
    expected = reference_kth(scores, ks)
    monkeypatch.setattr(threshold, "TOPK_WORKSPACE_BYTES", 1)  # one row per topk: exercises the grouping too
    with NoHostSync():
        tau = kth_smallest_on_device(scores, ks)
        keep = scores > tau[:, None]
    assert tau.tolist() == expected
    assert keep.sum(1).tolist() == (scores > torch.tensor(expected)[:, None]).sum(1).tolist()


def test_the_guard_catches_what_would_synchronise():
    scores = scores_with_ties(rows=1, n=1000)
    with pytest.raises(AssertionError):
        with NoHostSync():
            threshold.kth_smallest(scores, [10])  # the host path reads counts back: fine on the CPU only


@pytest.mark.parametrize("p", [0.0, 0.3, 0.5, 0.505, 0.51, 0.7, 0.9, 0.999, 0.9999])
def test_host_and_device_thresholds_agree_on_large_rows(p):
    scores = scores_with_ties(rows=2, n=600_000, seed=1)  # above the host path's sampling threshold
    ks = [removal_count(p, scores.shape[1])] * 2
    host = kth_smallest_host(scores.numpy(), ks)
    device = kth_smallest_on_device(scores, ks).tolist()
    assert host == device == reference_kth(scores, ks)


def test_host_threshold_survives_a_misleading_sample():
    """A systematic sample that sees only one value cannot bracket the k-th one: the counts notice, the answer is exact."""
    n = 1_000_000
    stride = (n // threshold.HOST_SAMPLE) | 1  # the sample is values[::stride]
    values = np.linspace(1, 2, n, dtype=np.float32)
    values[::stride] = 0  # the sample sees only zeros
    zeros = len(values[::stride])
    for k in (1, zeros, zeros + 1, int(0.7 * n), n):
        assert kth_smallest_host(values[None], [k]) == [float(np.sort(values)[k - 1])]


@pytest.mark.parametrize("n", [300_000, 600_000])  # below and above the size where the host path samples
def test_keep_above_quantile_is_the_same_on_both_paths(n):
    scores = scores_with_ties(rows=6, n=n, seed=2)
    sparsity = [0.0, 0.3, 0.6, 0.95, 0.99999, 1.0]  # 0.3: the threshold ties with the dead neurons at 0
    host = keep_above_quantile(scores, sparsity)
    tau = kth_smallest_on_device(scores, [removal_count(p, scores.shape[1]) for p in sparsity])
    assert host[0].all() and not host[5].any()
    assert torch.equal(host[1:], (scores > tau[:, None])[1:])


def test_host_mask_survives_a_misleading_sample():
    n = 1_000_000
    stride = (n // threshold.HOST_SAMPLE) | 1
    values = torch.linspace(1, 2, n)
    values[::stride] = 0
    for p in (0.01, 0.5, 0.7):
        keep = keep_above_quantile(values[None], [p])
        k = removal_count(p, n)
        assert torch.equal(keep[0], values > values.sort().values[k - 1])


@pytest.mark.cuda
def test_pathway_gradient_queues_without_synchronising_on_cuda():
    from handler.engine import METHODS

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(inplace=True), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 30 * 30, 10)).cuda().eval().requires_grad_(False)
    x = torch.randn(4, 3, 32, 32, device="cuda")
    targets = torch.tensor([-1, 2, -1, 5], device="cuda")
    METHODS.get("pathway_gradient")(model, x, targets, sparsity=[0.7] * 4)  # warm-up (lazy CUDA init)
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.enable_grad():
            out = METHODS.get("pathway_gradient")(model, x, targets, sparsity=[0.5, 0.7, 0.7, 0.9])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu = METHODS.get("pathway_gradient")(model.cpu(), x.cpu(), targets.cpu(), sparsity=[0.5, 0.7, 0.7, 0.9])
    assert (out.pathway.keep.cpu() == cpu.pathway.keep).float().mean() > 0.999  # TF32 convolutions may differ
