"""Batches are sized from a memory budget, and an out-of-memory degrades to smaller batches instead of failing."""

import pytest
import torch
from torch import nn

from handler.engine import Explainer, MemoryBudget
from handler.engine.batching import DEFAULT_BYTES_PER_NEURON, BatchPlanner
from tiny_models import FlattenHeadCNN


NEURONS = 8 * 16 * 16 + 16 * 8 * 8  # per 16x16 sample: the two ReLU calls


class OutOfMemoryAbove(nn.Module):
    """Behaves like its inner model, but raises ``torch.OutOfMemoryError`` for batches above ``limit``."""

    def __init__(self, inner: nn.Module, limit: int):
        super().__init__()
        self.inner = inner
        self.limit = limit
        self.batches: list = []

    def forward(self, x):
        self.batches.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError(f"injected: batch of {x.shape[0]} > {self.limit}")
        return self.inner(x)


def batch():
    torch.manual_seed(1)
    return torch.randn(8, 3, 16, 16)


def maps(explanations):
    return torch.stack([torch.from_numpy(e.attribution) for e in explanations])


def test_an_out_of_memory_batch_is_split_and_gives_the_same_explanations():
    x = batch()
    sparsity = [0.5, 0.6, 0.7, 0.8, 0.9, 0.5, 0.6, 0.7]
    expected = Explainer(FlattenHeadCNN()).explain(x, sparsity=sparsity)
    flaky = OutOfMemoryAbove(FlattenHeadCNN(), limit=3)
    explainer = Explainer(flaky)
    got = explainer.explain(x, sparsity=sparsity)
    torch.testing.assert_close(maps(got), maps(expected), rtol=1e-5, atol=1e-6)
    assert [e.pathway["realised_sparsity"] for e in got] == [e.pathway["realised_sparsity"] for e in expected]
    assert [e.target for e in got] == [e.target for e in expected]
    # the one-sample instrumentation check (plain; the site survey at one and two samples; instrumented);
    # the whole batch and its half fail; quarters fit (two passes each)
    assert flaky.batches == [1, 1, 2, 1, 8, 4] + [2] * 8
    assert explainer.planner.ceiling(("pathway_gradient", "contribution", (3, 16, 16), torch.float32)) == 2

    flaky.batches.clear()  # the next call starts at the size that worked: no failure, no retry
    explainer.explain(x, sparsity=0.7)
    assert flaky.batches == [2] * 8


def test_out_of_memory_with_a_single_sample_is_raised_and_leaves_the_model_as_it_was():
    flaky = OutOfMemoryAbove(FlattenHeadCNN(), limit=1)
    explainer = Explainer(flaky)
    explainer.explain(batch()[:1])  # fits: also runs the instrumentation check
    flaky.limit = 0
    flaky.train()
    with pytest.raises(torch.OutOfMemoryError):
        explainer.explain(batch()[:2])
    assert flaky.training and all(p.requires_grad for p in flaky.parameters())
    assert torch._C._len_torch_function_stack() == 0


def test_batch_size_follows_the_memory_budget():
    recorder = OutOfMemoryAbove(FlattenHeadCNN(), limit=10**6)
    per_sample = DEFAULT_BYTES_PER_NEURON * NEURONS
    explainer = Explainer(recorder, memory_budget=int(3.5 * per_sample))
    explainer.explain(batch(), sparsity=0.7)
    # the one-sample instrumentation check (plain, the site survey at one and two samples, instrumented),
    # then 3 + 3 + 2 samples, two passes each
    assert recorder.batches == [1, 1, 2, 1, 3, 3, 3, 3, 2, 2]

    recorder.batches.clear()  # the survey is kept per model and input shape: a new explainer does not repeat it
    Explainer(recorder, max_batch_size=2).explain(batch(), method="gradient")
    assert recorder.batches == [1, 1, 2, 2, 2, 2]


def test_memory_budget_parsing_and_defaults():
    assert MemoryBudget.parse("4GiB").bytes == 4 * 2**30
    assert MemoryBudget.parse("512 MB").bytes == 512 * 10**6
    assert MemoryBudget.parse(1_000_000).bytes == 1_000_000
    assert MemoryBudget.parse("60%").fraction == pytest.approx(0.6)
    assert MemoryBudget.parse(None, max_batch=16) == MemoryBudget(max_batch=16)
    assert MemoryBudget.parse("auto") == MemoryBudget()
    for bad in ("lots", "-1GB", "0%", "150%", True):
        with pytest.raises(ValueError):
            MemoryBudget.parse(bad)
    cpu = torch.device("cpu")
    assert 0 < MemoryBudget().available(cpu) < MemoryBudget(fraction=1.0).available(cpu) + 1


def test_planner_learns_from_measured_peaks_and_failures():
    planner = BatchPlanner(MemoryBudget(bytes=1000), torch.device("cpu"))
    assert planner.batch_size("k", neurons_per_sample=1, wanted=100) == 1000 // DEFAULT_BYTES_PER_NEURON
    planner.observe("k", batch=4, peak_bytes=400)  # 100 bytes per sample measured
    assert planner.batch_size("k", 1, 100) == 10
    assert planner.out_of_memory("k", 10) == 5
    assert planner.batch_size("k", 1, 100) == 5 and planner.batch_size("k", 1, 3) == 3
    assert planner.batch_size("other", 10**9, 100) == 1  # never below one


def test_each_split_is_reported_to_the_listener():
    from handler.engine import BatchSplit

    explainer = Explainer(OutOfMemoryAbove(FlattenHeadCNN(), limit=3))
    splits = []
    explainer.on_batch_split = splits.append
    explainer.explain(batch(), sparsity=0.7)
    # 8 fails -> 4 fails -> 2 succeeds; then the learned ceiling of 2 is used without failing again
    assert splits == [BatchSplit(size=8, parts=(4, 4)), BatchSplit(size=4, parts=(2, 2))]
