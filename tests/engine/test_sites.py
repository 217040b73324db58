"""Activation sites are found by call (module, functional, in-place, reused) and the model is left untouched."""

import pytest
import torch
import torchvision
from torch import nn

from handler.engine import Explainer, instrument
from handler.engine.sites import trace_sites
from handler.engine.sites import NoActivationSitesError
from tiny_models import kaiming


@pytest.fixture(scope="module")
def resnet18():
    return kaiming(torchvision.models.resnet18(weights=None))


def test_resnet18_reused_inplace_relu_is_one_site_per_call(resnet18):
    layout = trace_sites(resnet18, torch.randn(1, 3, 64, 64))
    # stem relu + 8 BasicBlocks x 2 calls of the same in-place module
    assert len(layout) == 17
    names = [s.name for s in layout]
    assert names[:3] == ["relu", "layer1.0.relu", "layer1.0.relu#2"]
    assert len(set(names)) == 17
    assert all(s.kind == "relu" and s.piecewise_linear for s in layout)
    offsets = [s.offset for s in layout]
    assert offsets == sorted(offsets) and layout.total == sum(s.numel for s in layout)


def test_googlenet_functional_relu_calls_are_sites():
    model = kaiming(torchvision.models.googlenet(weights=None, aux_logits=False, init_weights=False))
    layout = trace_sites(model, torch.randn(1, 3, 64, 64))
    # every BasicConv2d ends in F.relu(x, inplace=True): 3 stem convs + 9 inception blocks x 6
    assert len(layout) == 57
    assert layout.sites[0].name == "conv1:relu"
    assert all(s.kind == "relu" for s in layout)
    explanation = Explainer(model).explain(torch.randn(1, 3, 64, 64), sparsity=0.7)[0]
    assert explanation.attribution_scale > 0
    assert explanation.pathway["realised_sparsity"] >= 0.7


def test_mobilenet_v2_relu6_sites():
    model = kaiming(torchvision.models.mobilenet_v2(weights=None))
    layout = trace_sites(model, torch.randn(1, 3, 64, 64))
    assert len(layout) == 35 and {s.kind for s in layout} == {"relu6"}
    explanation = Explainer(model).explain(torch.randn(1, 3, 64, 64), sparsity=0.5)[0]
    assert explanation.pathway["locally_linear"] is True
    assert explanation.notes == []


def hooked_relu_scores(model, x, second_target: int) -> tuple:
    """``|a ⊙ ∂logit/∂a|`` at every ReLU module's output, from forward hooks on a non-in-place copy of ``model``
    (sample 0's target: its predicted class; sample 1's: ``second_target``); returns (per-site scores,
    targets)."""
    import copy

    reference = copy.deepcopy(model)
    captured = []
    for m in reference.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
            m.register_forward_hook(lambda _m, _i, out: captured.append(out) or out.retain_grad())
    logits = reference(x.clone())
    targets = torch.tensor([logits[0].argmax().item(), second_target])
    logits.gather(1, targets[:, None]).sum().backward()
    return [(a * a.grad).abs() for a in captured], targets


def test_resnet18_contributions_match_a_hook_based_reference(resnet18):
    """Scores from call-site interception equal those from forward hooks on a non-in-place copy."""
    from handler.engine.pathways import SELECTIONS

    x = torch.randn(2, 3, 64, 64)
    pathway = SELECTIONS.get("contribution")(resnet18, x, torch.tensor([-1, 5]), [0.6, 0.6])

    per_site, targets = hooked_relu_scores(resnet18, x, 5)
    scores = torch.cat([s.flatten(1) for s in per_site], 1)
    k = int(0.6 * scores.shape[1] + 0.999999)
    tau = scores.kthvalue(k, dim=1, keepdim=True).values
    expected = scores > tau
    agreement = (expected == pathway.keep).float().mean().item()
    assert agreement > 0.9999, agreement
    assert pathway.targets.tolist() == targets.tolist()


def test_a_channels_last_model_gets_channels_last_sites_with_the_same_pathway(resnet18):
    """Sites of a channels-last model keep their neurons in NHWC order on the flat axis, so every view the engine
    writes scores or reads masks through walks memory in order; the selected neurons are the ones a hook-based
    reference on the same channels-last model selects, site by site."""
    import copy

    from handler.engine.pathways import SELECTIONS

    model = copy.deepcopy(resnet18).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    pathway = SELECTIONS.get("contribution")(model, x, torch.tensor([-1, 5]), [0.6, 0.6])
    assert all(site.channels_last for site in pathway.layout)
    assert pathway.layout == trace_sites(resnet18, x)  # the same sites as the contiguous model's
    numbered = torch.arange(2 * pathway.layout.total).view(2, -1)
    for site in pathway.layout:
        view = site.view(pathway.keep)
        c, h, w = site.shape
        assert view.shape[1:] == site.shape and view.stride()[1:] == (1, w * c, c)  # each sample NHWC in memory
        assert torch.equal(site.flat(site.view(numbered)), numbered[:, site.offset:site.offset + site.numel])

    per_site, targets = hooked_relu_scores(model, x, 5)
    scores = torch.cat([s.flatten(1) for s in per_site], 1)
    tau = scores.kthvalue(int(0.6 * scores.shape[1] + 0.999999), dim=1, keepdim=True).values
    agree = sum((site.view(pathway.keep) == (s > tau[:, :, None, None])).sum().item()
                for site, s in zip(pathway.layout, per_site))
    assert agree / pathway.keep.numel() > 0.9999
    assert pathway.targets.tolist() == targets.tolist()


class PaddedDepthwise(nn.Module):
    """ReLU, then TF-"same" padding (asymmetric, as timm's ``Conv2dSame`` pads a strided convolution) before a
    depthwise convolution; records whether each padded tensor is still channels-last."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, stride=2, groups=8)
        self.fc = nn.Linear(8, 4)
        self.padded_channels_last: list = []

    def forward(self, x):
        padded = nn.functional.pad(torch.relu(self.stem(x)), [0, 1, 0, 1])
        self.padded_channels_last.append(padded.is_contiguous(memory_format=torch.channels_last))
        return self.fc(torch.relu(self.depthwise(padded)).mean(dim=(2, 3)))


def test_a_lone_channels_last_sample_stays_channels_last_through_the_contribution_probe():
    """The contribution probe (an identity autograd Function) hands the network a view with the activation's
    own strides. ``view_as`` would give a batch of one a batch stride that no
    longer reads as channels-last: torch's padding then lays its output out NCHW, and the convolution after it
    copies it back, in the forward and in the backward."""
    model = PaddedDepthwise().eval().to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    Explainer(model).explain(x, method="pathway_gradient", sparsity=0.5)
    assert model.padded_channels_last and all(model.padded_channels_last), model.padded_channels_last


def test_a_channels_last_model_explains_like_its_contiguous_copy(resnet18):
    import copy

    import numpy as np

    x = torch.randn(2, 3, 64, 64)
    contiguous = Explainer(resnet18).explain(x, [3, 5], sparsity=0.6)
    model = copy.deepcopy(resnet18).to(memory_format=torch.channels_last)
    channels_last = Explainer(model).explain(x.contiguous(memory_format=torch.channels_last), [3, 5], sparsity=0.6)
    for a, b in zip(contiguous, channels_last):
        assert abs(a.pathway["kept_neurons"] - b.pathway["kept_neurons"]) <= 1e-4 * a.pathway["total_neurons"]
        assert np.corrcoef(a.attribution.ravel(), b.attribution.ravel())[0, 1] > 0.99
        assert [s["top_channels"] for s in a.pathway["sites"]] == [s["top_channels"] for s in b.pathway["sites"]]


def _assert_untouched(model, before_state, before_flags, training):
    after = model.state_dict()
    assert before_state.keys() == after.keys()
    assert all(torch.equal(before_state[k], after[k]) for k in after)
    assert [p.requires_grad for p in model.parameters()] == before_flags
    assert all(p.grad is None for p in model.parameters())
    assert model.training == training
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
    assert torch._C._len_torch_function_stack() == 0


def test_model_is_unchanged_after_explaining():
    model = kaiming(torchvision.models.resnet18(weights=None)).train()
    params = list(model.parameters())
    for p in params[::2]:
        p.requires_grad_(False)
    flags = [p.requires_grad for p in params]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    explainer = Explainer(model)
    explainer.explain(torch.randn(2, 3, 64, 64), sparsity=0.7)
    explainer.explain(torch.randn(1, 3, 64, 64), method="gradient")
    _assert_untouched(model, state, flags, training=True)


def test_model_is_unchanged_after_a_failing_call():
    class FailsOnSecondPass(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.relu = nn.ReLU(inplace=True)
            self.fc = nn.Linear(4, 10)
            self.calls = 0

        def forward(self, x):
            x = self.relu(self.conv(x))
            self.calls += 1
            # plain check pass, the site survey's two passes (one sample, two), instrumented check pass,
            # scoring pass, then fail inside the pathway pass
            if self.calls == 6:
                raise RuntimeError("boom")
            return self.fc(x.mean(dim=(2, 3)))

    model = FailsOnSecondPass()
    flags = [p.requires_grad for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="boom"):
        Explainer(model).explain(torch.randn(1, 3, 8, 8))
    model.calls = 0
    _assert_untouched(model, state, flags, training=True)


def test_smooth_activations_still_work_and_say_linearity_does_not_hold():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.SiLU(), nn.Conv2d(8, 8, 3), nn.GELU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 5)).eval()
    [explanation] = Explainer(model).explain(torch.randn(1, 3, 16, 16), sparsity=0.5)
    assert explanation.pathway["locally_linear"] is False
    assert explanation.pathway["nonlinear_activations"] == ["gelu", "silu"]
    assert any("not exactly linear" in note for note in explanation.notes)
    assert explanation.attribution_scale > 0


def test_a_model_without_activations_is_refused_clearly():
    model = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 6 * 6, 3)).eval()
    with pytest.raises(NoActivationSitesError, match="no activation call"):
        Explainer(model).explain(torch.randn(1, 3, 8, 8))


def test_models_that_rely_on_inplace_side_effects_are_refused_clearly():
    class SideEffect(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            x = self.conv(x)
            x.relu_()  # return value ignored: only the in-place effect is used
            return self.fc(x.mean(dim=(2, 3)))

    with pytest.raises(RuntimeError, match="in-place activation's side effect"):
        Explainer(SideEffect().eval()).explain(torch.randn(1, 3, 8, 8))


def test_explaining_works_inside_inference_mode(resnet18):
    with torch.inference_mode():
        x = torch.randn(1, 3, 64, 64)
        [explanation] = Explainer(resnet18).explain(x, sparsity=0.5)
    assert explanation.attribution_scale > 0


def test_instrument_restores_on_exception_inside_the_block(resnet18):
    with pytest.raises(ValueError):
        with instrument(resnet18):
            raise ValueError("inside")
    assert torch._C._len_torch_function_stack() == 0
    assert all(not m._forward_hooks for m in resnet18.modules())


@pytest.mark.cuda
def test_cuda_maps_match_cpu_maps(resnet18):
    import copy

    x = torch.randn(2, 3, 64, 64)
    cpu = Explainer(copy.deepcopy(resnet18)).explain(x, sparsity=0.7)
    gpu = Explainer(copy.deepcopy(resnet18), device="cuda").explain(x, sparsity=0.7)
    for a, b in zip(cpu, gpu):
        assert a.target == b.target
        corr = torch.corrcoef(torch.stack([torch.from_numpy(a.attribution).flatten(),
                                           torch.from_numpy(b.attribution).flatten()]))[0, 1]
        assert corr > 0.99
        assert abs(a.pathway["realised_sparsity"] - b.pathway["realised_sparsity"]) < 1e-3


class FoldedAndShared(nn.Module):
    """One call of each kind: per sample, patches folded into the batch (MobileViT), and a table of
    parameters shared by the whole batch (Swin-V2's position-bias MLP)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.mix = nn.Linear(6, 6)
        self.coords = nn.Parameter(torch.randn(1, 5, 2))
        self.table_mlp = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, 6))
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        h = torch.relu(self.conv(x))  # [B, 6, 8, 8]: per sample
        b, c = h.shape[:2]
        patches = h.reshape(b, c, 2, 4, 2, 4).permute(0, 2, 4, 3, 5, 1).reshape(b * 4, 16, c)  # [4B, 16, 6]
        patches = torch.relu(self.mix(patches))  # batch-folded
        bias = self.table_mlp(self.coords).mean(dim=1)  # [1, 6]: shared by the batch
        pooled = patches.reshape(b, 4 * 16, c).mean(dim=1) + bias
        return self.fc(pooled)


def test_each_call_is_classified_per_sample_folded_or_shared_and_summarised_with_its_kind():
    model = FoldedAndShared().eval()
    layout = trace_sites(model, torch.randn(3, 3, 8, 8))
    assert [(s.batch, s.shape) for s in layout.sites] == [
        ("per_sample", (6, 8, 8)), ("batch_folded", (4, 16, 6)), ("batch_shared", (1, 5, 8))]
    assert layout.total == 6 * 64 + 4 * 16 * 6  # the shared table holds no neuron of a pathway
    assert len(layout) == 2 and len(layout.sites) == 3  # iterating a layout covers the selectable sites
    [explanation] = Explainer(model).explain(torch.randn(1, 3, 8, 8), sparsity=0.5)
    calls = [(s["call"], s["total"]) for s in explanation.pathway["sites"]]
    assert calls == [("per_sample", 384), ("batch_folded", 384), ("batch_shared", 0)]
    assert explanation.pathway["sites"][2]["selectable"] is False


def test_a_batch_with_folded_and_shared_calls_gives_each_sample_its_maps_alone():
    model = FoldedAndShared().eval()
    torch.manual_seed(1)
    x = torch.randn(3, 3, 8, 8)
    targets = [0, 3, 1]
    explainer = Explainer(model)
    together = explainer.explain(x, targets, sparsity=0.6)
    for b, t in enumerate(targets):
        [alone] = explainer.explain(x[b:b + 1], [t], sparsity=0.6)
        assert alone.pathway["kept_neurons"] == together[b].pathway["kept_neurons"]
        assert [s["kept"] for s in alone.pathway["sites"]] == [s["kept"] for s in together[b].pathway["sites"]]
        torch.testing.assert_close(torch.from_numpy(alone.attribution), torch.from_numpy(together[b].attribution),
                                   rtol=1e-5, atol=1e-6)


class InPlaceResidual(nn.Module):
    """EfficientNetV2's FusedMBConv without expansion: ``result = silu(bn(conv(x))); result += x``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = nn.functional.silu(self.stem(x))
        result = nn.functional.silu(self.conv(h))
        result += h  # in place, on an activation's output, after it returned
        return self.fc(result.mean(dim=(2, 3)))


def test_in_place_add_on_an_activation_output_is_scored_with_the_activation_value_and_its_gradient():
    from handler.engine.contribution import _abs_contribution, score_neurons, select_by_contribution
    from handler.engine.pathways import run_along

    model = InPlaceResidual().eval().requires_grad_(False)
    x = torch.randn(2, 3, 6, 6)
    targets = torch.tensor([0, 2])
    scores, layout, *_ = score_neurons(model, x, targets, _abs_contribution)
    assert [s.overwritten for s in layout] == [False, True]  # only the overwritten output gets a copy
    # independently: the activations as returned, and the target's gradient with respect to each
    h = nn.functional.silu(model.stem(x)).requires_grad_(True)
    a = nn.functional.silu(model.conv(h))
    a_value = a.detach().clone()
    a.retain_grad()
    out = a + h
    logits = model.fc(out.mean(dim=(2, 3)))
    logits.gather(1, targets[:, None]).sum().backward()
    expected = torch.cat([(h.detach() * h.grad).abs().flatten(1), (a_value * a.grad).abs().flatten(1)], dim=1)
    torch.testing.assert_close(scores, expected)
    # the pathway pass: the masked activation, then the model's in-place add, then the gradient to the input
    pathway = select_by_contribution(model, x, targets, [0.5, 0.5])
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(run_along(model, xg, pathway).gather(1, targets[:, None]).sum(), xg)
    m1, m2 = (site.view(pathway.keep).float() for site in pathway.layout)
    xr = x.clone().requires_grad_(True)
    h = nn.functional.silu(model.stem(xr)) * m1
    ref = model.fc((nn.functional.silu(model.conv(h)) * m2 + h).mean(dim=(2, 3)))
    (expected_grad,) = torch.autograd.grad(ref.gather(1, targets[:, None]).sum(), xr)
    torch.testing.assert_close(grad, expected_grad)


class Clamps(nn.Module):
    """In-place ReLU6 and Hardtanh (one on a slice of a tensor), and a ReLU6 output the model adds to in place."""

    def __init__(self, inplace: bool):
        super().__init__()
        torch.manual_seed(0)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.relu6 = nn.ReLU6(inplace=inplace)
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.hardtanh = nn.Hardtanh(-0.5, 0.7, inplace=inplace)
        self.last = nn.Conv2d(8, 8, 1)
        self.inplace = inplace
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = self.relu6(self.stem(x))
        g = self.conv(h)
        g = torch.cat([self.hardtanh(g[:, :4]), g[:, 4:]], dim=1)  # the in-place call works on a view
        out = nn.functional.relu6(self.last(g), inplace=self.inplace)
        out += h  # overwritten after it returned: this site keeps torch's own in-place call
        return self.fc(out.mean(dim=(2, 3)))


@pytest.mark.parametrize("channels_last", [False, True])
def test_in_place_clamps_are_not_copied_and_give_the_same_bits_as_out_of_place_ones(channels_last):
    """ReLU6 / Hardtanh called in place: autograd's own in-place op copies its input at every site and pass;
    the engine's runs without that copy and must give exactly the gradients of the out-of-place call."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from handler.engine.contribution import _abs_contribution, score_neurons, select_by_contribution
    from handler.engine.pathways import run_along

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(3, 3, 8, 8).contiguous(memory_format=fmt)
    targets = torch.tensor([0, 3, -1])
    results = {}
    for inplace in (True, False):
        model = Clamps(inplace).eval().requires_grad_(False).to(memory_format=fmt)
        scores, layout, *_ = score_neurons(model, x, targets, _abs_contribution)
        pathway = select_by_contribution(model, x, targets, [0.6] * 3)
        xg = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(run_along(model, xg, pathway).gather(1, pathway.targets[:, None]).sum(), xg)
        results[inplace] = (scores.clone(), pathway.keep, grad)
        assert [(s.kind, s.overwritten) for s in layout] == [("relu6", False), ("hardtanh", False), ("relu6", True)]
    for ours, reference in zip(results[True], results[False]):
        assert torch.equal(ours, reference)

    class Copies(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.clone.default and args[0].shape[1] in (4, 8):  # not the input's
                Copies.count += 1
            return func(*args, **(kwargs or {}))

    model = Clamps(True).eval().requires_grad_(False).to(memory_format=fmt)
    pathway = select_by_contribution(model, x, targets, [0.6] * 3)
    with Copies():
        run_along(model, x.clone().requires_grad_(True), pathway)
    assert Copies.count == 1  # only the overwritten site's in-place call copies its input
