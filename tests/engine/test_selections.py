"""The other pathway selections: shape, sparsity, dead-neuron accounting, determinism and batching."""

import copy
import math

import pytest
import torch
from torch import nn

from handler.engine import SELECTIONS, Explainer, instrument
from handler.engine.selections import OVERLAP_TOP_CHANNELS
from handler.engine.sites import survey_sites
from handler.evaluation.pathway_overlap import alive_neurons
from tiny_models import BatchSizeSpy, TwoReluCNN, kaiming_resnet18

FAST = {
    "contribution": {},
    "random": {"seed": 1},
    "pruning_gates": {"iterations": 4},
    "resampling_correlation": {"copies": 6, "chunk_size": 4},
    "resampling_precision": {"copies": 6, "chunk_size": 4},
    "neuron_integrated_gradients": {"steps": 2, "chunk_size": 3},
}


@pytest.fixture(scope="module")
def small_cnn():
    torch.manual_seed(0)
    return TwoReluCNN().double().eval().requires_grad_(False)


@pytest.fixture(scope="module")
def inputs():
    torch.manual_seed(1)
    return torch.randn(3, 3, 12, 12, dtype=torch.float64)


@pytest.fixture(scope="module")
def resnet18():
    """Kaiming weights keep about half the neurons alive (torchvision's defaults can vanish in depth)."""
    return kaiming_resnet18()


@pytest.fixture(scope="module")
def resnet_pathways(resnet18):
    """Every selection on the same ResNet-18 batch (64×64), with the contribution pathway as the reference layout."""
    torch.manual_seed(2)
    x = torch.randn(2, 3, 64, 64)
    targets = torch.tensor([-1, 4])
    return x, targets, {name: SELECTIONS.get(name)(resnet18, x, targets, [0.7, 0.5], **FAST[name])
                        for name in FAST}


@pytest.mark.parametrize("name", list(FAST))
def test_every_selection_gives_a_pathway_over_the_same_sites(resnet18, resnet_pathways, name):
    x, targets, pathways = resnet_pathways
    reference, pathway = pathways["contribution"], pathways[name]
    assert pathway.layout == reference.layout
    assert pathway.keep.shape == (2, reference.layout.total) and pathway.keep.dtype == torch.bool
    assert list(pathway.requested_sparsity) == [0.7, 0.5]
    assert (pathway.realised_sparsity() >= torch.tensor([0.7, 0.5], dtype=torch.float64) - 1e-12).all()
    assert pathway.targets.tolist() == [resnet18(x[:1]).argmax().item(), 4]
    torch.testing.assert_close(pathway.logits, resnet18(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", list(FAST))
def test_every_selection_counts_the_dead_neurons_it_keeps(resnet18, resnet_pathways, name):
    """The summary counts kept ∧ dead, dead meaning zero in the full network (measured independently here)."""
    x, _, pathways = resnet_pathways
    pathway = pathways[name]
    _, alive = alive_neurons(resnet18, x)
    assert 0.2 < alive.double().mean().item() < 0.8  # kaiming ResNet on noise: about half are dead
    if pathway.alive is not None:
        assert torch.equal(pathway.alive, alive)
    dead_kept = (pathway.keep & ~alive).sum(1).tolist()
    assert [s["kept_dead_neurons"] for s in pathway.summaries()] == dead_kept
    if name == "contribution":
        assert dead_kept == [0, 0]  # a dead neuron scores 0, so it is never above the threshold
    if name == "random":
        dead_fraction = 1 - alive.double().mean(1)
        kept = pathway.keep.sum(1).double()
        assert torch.allclose(torch.tensor(dead_kept).double() / kept, dead_fraction, atol=0.02)


def test_contribution_records_the_alive_mask_only_when_a_sample_keeps_every_neuron(resnet18):
    """Above sparsity 0 no dead neuron can be kept, so the [B, N] mask is skipped; at 0 all are kept and counted."""
    torch.manual_seed(3)
    x = torch.randn(2, 3, 64, 64)
    _, alive = alive_neurons(resnet18, x)
    select = SELECTIONS.get("contribution")
    sparse = select(resnet18, x, torch.tensor([-1, -1]), [0.3, 0.5])
    assert sparse.alive is None and [s["kept_dead_neurons"] for s in sparse.summaries()] == [0, 0]
    measured = select(resnet18, x, torch.tensor([-1, -1]), [0.3, 0.5], record_alive=True)
    assert torch.equal(measured.alive, alive) and torch.equal(measured.keep, sparse.keep)
    assert [s["kept_dead_neurons"] for s in measured.summaries()] == [0, 0]
    full = select(resnet18, x, torch.tensor([-1, -1]), [0.0, 0.5])
    assert torch.equal(full.alive, alive)
    assert [s["kept_dead_neurons"] for s in full.summaries()] == [int((~alive[0]).sum()), 0]


@pytest.mark.parametrize("name", list(FAST))
def test_pathway_gradient_follows_every_selection(resnet18, name):
    x = torch.randn(1, 3, 32, 32)
    [e] = Explainer(resnet18).explain(x, sparsity=0.6, selection=name, **FAST[name])
    assert e.pathway["selection"] == name and e.pathway["realised_sparsity"] >= 0.6
    assert e.attribution.shape == (32, 32)
    assert "kept_dead_neurons" in e.pathway and e.pathway_probability is not None


def test_random_selection_is_seeded_exact_and_independent_of_the_batch(small_cnn, inputs):
    targets = torch.tensor([-1, -1, -1])
    select = SELECTIONS.get("random")
    a = select(small_cnn, inputs, targets, [0.6, 0.6, 0.3], seed=7)
    assert torch.equal(a.keep, select(small_cnn, inputs, targets, [0.6, 0.6, 0.3], seed=7).keep)
    assert not torch.equal(a.keep, select(small_cnn, inputs, targets, [0.6, 0.6, 0.3], seed=8).keep)
    total = a.layout.total
    assert a.keep.sum(1).tolist() == [total - math.ceil(0.6 * total)] * 2 + [total - math.ceil(0.3 * total)]
    one = select(small_cnn, inputs[2:], targets[2:], [0.3], seed=7)
    assert torch.equal(one.keep[0], a.keep[2])


def test_pruning_gates_of_a_batch_do_not_interact(small_cnn, inputs):
    targets = torch.tensor([-1, 1, -1])
    select = SELECTIONS.get("pruning_gates")
    batch = select(small_cnn, inputs, targets, [0.5, 0.7, 0.6], iterations=6, init="random", seed=3)
    for b, p in enumerate([0.5, 0.7, 0.6]):
        one = select(small_cnn, inputs[b:b + 1], targets[b:b + 1], [p], iterations=6, init="random", seed=3)
        assert torch.equal(one.keep[0], batch.keep[b])
        for site_batch, site_one in zip(batch.channel_scores, one.channel_scores):
            torch.testing.assert_close(site_one[0], site_batch[b], rtol=1e-9, atol=1e-12)
        assert one.details[0]["gates"]["final_distillation_loss"] == pytest.approx(
            batch.details[b]["gates"]["final_distillation_loss"], rel=1e-9)


def test_pruning_gates_learn_to_reproduce_the_output(small_cnn, inputs):
    """Random gates distort a confident network's output; the optimisation brings it back."""
    confident = copy.deepcopy(small_cnn)
    with torch.no_grad():
        confident.fc.weight.mul_(30)
    entropy = -(confident(inputs).softmax(1) * confident(inputs).log_softmax(1)).sum(1)
    select = SELECTIONS.get("pruning_gates")
    targets = torch.tensor([-1, -1, -1])
    losses = {n: torch.tensor([d["gates"]["final_distillation_loss"] for d in select(
        confident, inputs, targets, [0.5] * 3, iterations=n, init="random").details], dtype=torch.float64)
        for n in (1, 40)}
    excess = {n: loss - entropy for n, loss in losses.items()}  # KL(original ‖ gated) ≥ 0
    # lr 0.01 (the authors') learns slowly: here 40 steps lower the excess by 3-21 %, 100 steps by 5-48 %
    assert (excess[1] > 0.05).all() and (excess[40] < 0.99 * excess[1]).all(), excess


def test_random_gate_initialisation_keeps_dead_neurons_contribution_does_not(resnet_pathways, resnet18):
    """The paper's point about pruning pathways: with random gates, dead neurons survive; by contribution, none."""
    x, targets, pathways = resnet_pathways
    gated = SELECTIONS.get("pruning_gates")(resnet18, x, targets, [0.7, 0.5], iterations=4, init="random")
    dead_kept = [s["kept_dead_neurons"] / s["kept_neurons"] for s in gated.summaries()]
    assert all(fraction > 0.2 for fraction in dead_kept), dead_kept
    assert [s["kept_dead_neurons"] for s in pathways["contribution"].summaries()] == [0, 0]


# -- input resampling -----------------------------------------------------------


def reference_resampling_scores(model, x, copies, noise, seed, min_activation):
    """Lengerich et al.'s resampling (docs/methods.md) computed directly from every copy's stored activations (no streaming sums)."""
    generator = torch.Generator().manual_seed(seed)
    epsilon = torch.randn(x.shape[1:], generator=generator, dtype=x.dtype) * noise
    batch_copies = torch.stack([x[0] * (1 + k * epsilon) for k in range(copies)])
    acts = []
    with torch.no_grad(), instrument(model, lambda call: acts.append(call.run().clone()) or acts[-1]):
        logits = model(batch_copies)
    target = logits[0].argmax()
    y = logits.softmax(1)[:, target]  # [n]
    correlation, precision = [], []
    for a in acts:  # [n, C, H, W]
        a = a.flatten(2)  # [n, C, P]
        var_a = a.var(dim=0, unbiased=False)
        cov = ((a - a.mean(0)) * (y - y.mean())[:, None, None]).mean(0)
        r = cov / (var_a * y.var(unbiased=False)).sqrt()
        varying = var_a > 0
        corr = torch.where(varying, r.abs(), torch.zeros_like(r)).sum(1) / varying.sum(1).clamp(min=1)
        defined = a.mean(dim=(0, 2)) >= min_activation
        prec = torch.where(defined, 1 / var_a.mean(1), torch.zeros(()))
        correlation.append((corr, varying.any(1)))
        precision.append((prec, defined))
    return correlation, precision


def test_resampling_scores_match_a_direct_computation(small_cnn, inputs):
    x = inputs[:1]
    options = dict(copies=7, noise=0.1, seed=5, min_activation=0.05)
    correlation, precision = reference_resampling_scores(small_cnn, x, **options)
    for name, reference in (("resampling_correlation", correlation), ("resampling_precision", precision)):
        pathway = SELECTIONS.get(name)(small_cnn, x, torch.tensor([-1]), [0.5], chunk_size=3, **options)
        for scores, (expected, defined) in zip(pathway.channel_scores, reference):
            torch.testing.assert_close(scores[0][defined], expected[defined], rtol=1e-6, atol=1e-9)
            assert (scores[0][~defined] == 0).all()


def test_resampling_keeps_the_top_channels_of_every_site_whole(small_cnn, inputs):
    pathway = SELECTIONS.get("resampling_correlation")(small_cnn, inputs, torch.tensor([-1, -1, -1]),
                                                       [0.5, 0.75, 0.0], copies=6)
    for site, scores in zip(pathway.layout, pathway.channel_scores):
        keep = site.view(pathway.keep).flatten(2)  # [B, C, H·W]
        assert (keep.all(2) | ~keep.any(2)).all()  # a channel is kept with all its positions or not at all
        kept_channels = keep.any(2)
        channels = site.shape[0]
        for b, p in enumerate([0.5, 0.75, 0.0]):
            quota = channels - math.ceil(p * channels)
            assert kept_channels[b].sum() <= quota
            kept_scores, dropped_scores = scores[b][kept_channels[b]], scores[b][~kept_channels[b]]
            if len(kept_scores) and len(dropped_scores):
                assert kept_scores.min() >= dropped_scores.max()
    for b, summary in enumerate(pathway.summaries()):
        kept = sum(site.view(pathway.keep)[b].flatten(1).any(1).sum().item() for site in pathway.layout)
        assert summary["resampling"]["kept_channels"] == kept
        assert summary["resampling"]["total_channels"] == sum(site.shape[0] for site in pathway.layout)


def test_resampling_reports_the_authors_channel_overlap(small_cnn, inputs):
    x = inputs[:1]
    options = dict(copies=6, noise=0.1, seed=0, min_activation=0.1)
    correlation, precision = reference_resampling_scores(small_cnn, x, **options)
    shared = sizes = 0
    for (corr, corr_ok), (prec, prec_ok) in zip(correlation, precision):
        top = min(OVERLAP_TOP_CHANNELS, len(corr))
        a = set(torch.where(corr_ok, corr, -torch.inf).argsort(descending=True, stable=True)[:top].tolist())
        a &= set(torch.nonzero(corr_ok).flatten().tolist())
        b = set(torch.where(prec_ok, prec, -torch.inf).argsort(descending=True, stable=True)[:top].tolist())
        b &= set(torch.nonzero(prec_ok).flatten().tolist())
        shared, sizes = shared + len(a & b), sizes + len(a) + len(b)
    for name in ("resampling_correlation", "resampling_precision"):
        summary = SELECTIONS.get(name)(small_cnn, x, torch.tensor([-1]), [0.5], **options).summaries()[0]
        assert summary["resampling"]["channel_overlap"] == pytest.approx(shared / sizes)
        assert 0.0 <= summary["resampling"]["channel_overlap"] <= 0.5


@pytest.mark.parametrize("name", ["resampling_correlation", "resampling_precision"])
def test_resampling_is_seeded_chunk_independent_and_batch_independent(small_cnn, inputs, name):
    select = SELECTIONS.get(name)
    targets = torch.tensor([-1, 2, -1])
    batch = select(small_cnn, inputs, targets, [0.5, 0.6, 0.4], copies=6, chunk_size=4, seed=2)
    again = select(small_cnn, inputs, targets, [0.5, 0.6, 0.4], copies=6, chunk_size=18, seed=2)
    assert torch.equal(batch.keep, again.keep)
    for b, p in enumerate([0.5, 0.6, 0.4]):
        one = select(small_cnn, inputs[b:b + 1], targets[b:b + 1], [p], copies=6, chunk_size=1, seed=2)
        assert torch.equal(one.keep[0], batch.keep[b])
        assert one.targets.item() == batch.targets[b].item()
        for site_one, site_batch in zip(one.channel_scores, batch.channel_scores):
            torch.testing.assert_close(site_one[0], site_batch[b], rtol=1e-6, atol=1e-9)
    other_seed = select(small_cnn, inputs, targets, [0.5, 0.6, 0.4], copies=6, seed=3)
    assert any(not torch.equal(s, t) for s, t in zip(other_seed.channel_scores, batch.channel_scores))


def test_resampling_never_forwards_more_than_a_chunk(small_cnn, inputs):
    spy = BatchSizeSpy(small_cnn)
    seen = spy.batch_sizes
    survey_sites(spy, inputs)  # once per model and input shape (one sample, then two), before any chunk
    assert seen == [1, 2]
    seen.clear()
    SELECTIONS.get("resampling_precision")(spy, inputs, torch.tensor([-1, -1, -1]), [0.5] * 3,
                                           copies=5, chunk_size=4)
    assert max(seen) == 4 and sum(seen) == 15


def test_neuron_integrated_gradients_add_up_per_layer_and_equal_the_contribution_where_the_rest_is_linear(
        small_cnn, inputs):
    """Per site, the signed scores sum to the target logit minus the logit with that site zeroed (integrated
    gradients' completeness along the layer, to the midpoint rule's error); after the last ReLU the network is
    linear, so there the score is exactly the contribution |a · ∂y/∂a|."""
    from handler.engine.contribution import _abs_contribution, score_neurons
    from handler.engine.selections import neuron_integrated_gradients

    targets = torch.tensor([-1, 2, -1])
    attributions, _, layout, logits, resolved = neuron_integrated_gradients(small_cnn, inputs, targets, 256, 64)
    contribution, *_ = score_neurons(small_cnn, inputs, targets, _abs_contribution)
    first, last = layout.sites[0], layout.sites[-1]
    span = slice(last.offset, last.offset + last.numel)
    torch.testing.assert_close(attributions[:, span].abs(), contribution[:, span])
    head = slice(first.offset, first.offset + first.numel)
    assert not torch.allclose(attributions[:, head].abs(), contribution[:, head])  # the later ReLU switches
    target_logit = logits.gather(1, resolved[:, None]).squeeze(1)
    for site in layout:
        def zeroed(call, site=site):
            out = call.run()
            return out * 0 if call.site.index == site.index else out

        with torch.no_grad(), instrument(small_cnn, zeroed, expected=layout, inputs=inputs):
            without = small_cnn(inputs).gather(1, resolved[:, None]).squeeze(1)
        summed = attributions[:, site.offset:site.offset + site.numel].sum(dim=1)
        torch.testing.assert_close(summed, target_logit - without, rtol=2e-3, atol=1e-6)


def test_neuron_integrated_gradients_do_not_depend_on_the_batch_or_the_chunk(small_cnn, inputs):
    from handler.engine.selections import neuron_integrated_gradients

    targets = torch.tensor([-1, 2, -1])
    together, *_ = neuron_integrated_gradients(small_cnn, inputs, targets, 5, 4)
    for chunk in (1, 7):
        other, *_ = neuron_integrated_gradients(small_cnn, inputs, targets, 5, chunk)
        torch.testing.assert_close(other, together)
    for i in range(inputs.shape[0]):
        alone, *_ = neuron_integrated_gradients(small_cnn, inputs[i:i + 1], targets[i:i + 1], 5, 4)
        torch.testing.assert_close(alone, together[i:i + 1])


# -- the model is left as it was --------------------------------------------------


ALL_REQUESTS = [(m, None, {"integrated_gradients": {"steps": 3}, "smoothgrad": {"samples": 2}}.get(m, {}))
                for m in ("input_x_gradient", "integrated_gradients", "smoothgrad", "grad_cam", "guided_backprop")]
ALL_REQUESTS += [("pathway_gradient", name, options) for name, options in FAST.items() if name != "contribution"]


@pytest.mark.parametrize("method, selection, options", ALL_REQUESTS,
                         ids=[f"{m}-{s}" if s else m for m, s, _ in ALL_REQUESTS])
def test_model_is_unchanged_after_explaining(method, selection, options):
    """Training mode, requires_grad flags, weights, BatchNorm statistics, no .grad, no hooks, no mode left behind."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                          nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)).train()
    params = list(model.parameters())
    for p in params[::2]:
        p.requires_grad_(False)
    flags = [p.requires_grad for p in params]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    Explainer(model).explain(torch.randn(2, 3, 16, 16), method=method, selection=selection, sparsity=0.5, **options)
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)
    assert [p.requires_grad for p in params] == flags
    assert all(p.grad is None for p in params)
    assert model.training
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    assert torch._C._len_torch_function_stack() == 0
