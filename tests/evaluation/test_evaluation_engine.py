"""Randomisation cascade, pathway overlap and method variants, on small networks."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

from handler.engine import SELECTIONS, Explainer
from handler.errors import InvalidOption
from handler.evaluation import (MethodVariant, alive_neurons, all_variants, cascade_stages, cascading_randomisation,
                                compare_selections, explain_maps, jaccard, reinitialise)
from handler.evaluation.pathway_overlap import chance_jaccard


class Declared(nn.Module):
    """Declares its head before its body: the cascade must follow the order modules run, not this order."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.stem_bn = nn.BatchNorm2d(8)
        self.blocks = nn.Sequential(
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
            nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        return self.head(self.pool(self.blocks(x)).flatten(1))


@pytest.fixture()
def net():
    torch.manual_seed(0)
    model = Declared().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    return model


def test_cascade_runs_from_the_logits_down_in_execution_order_with_norms_joined(net):
    x = torch.randn(1, 3, 16, 16)
    stages = cascade_stages(net, x)
    assert [s.modules for s in stages] == [("head",), ("blocks.1",), ("blocks.0",), ("stem", "stem_bn")]


def test_reinitialise_is_seeded_and_touches_only_its_module(net):
    a, b = copy.deepcopy(net), copy.deepcopy(net)
    reinitialise(a.head, seed=5)
    reinitialise(b.head, seed=5)
    assert torch.equal(a.head.weight, b.head.weight)
    assert not torch.equal(a.head.weight, net.head.weight)
    assert torch.equal(a.stem.weight, net.stem.weight)


def test_cascading_randomisation_leaves_the_model_alone_and_decorrelates_gradients(net):
    torch.manual_seed(1)
    x = torch.randn(4, 3, 16, 16)
    before = copy.deepcopy(net.state_dict())
    explainer = Explainer(net)
    original = explain_maps(explainer, x, MethodVariant("gradient"), targets=[0, 1, 2, 0])
    cascades = cascading_randomisation(net, x, [original], make_explainer=Explainer, seed=0)
    cascade = cascades["gradient"]
    assert cascade.stages == ["head", "blocks.1", "blocks.0", "stem+stem_bn"]
    assert cascade.metrics["spearman_abs"].shape == (4, 4)
    for key, value in net.state_dict().items():
        assert torch.equal(value, before[key]), key
    # A fully re-initialised network's gradients are unrelated to the trained one's (far from 1).
    assert np.nanmean(np.abs(cascade.metrics["spearman"][-1])) < 0.5
    again = cascading_randomisation(net, x, [original], make_explainer=Explainer, seed=0)["gradient"]
    assert np.allclose(again.metrics["spearman"], cascade.metrics["spearman"], equal_nan=True)


def test_a_stage_the_target_does_not_depend_on_leaves_the_maps_unchanged():
    """Re-initialising a unit after the logit that is explained cannot change its maps: similarity stays 1."""

    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                      nn.Flatten(), nn.Linear(4, 2))
            self.extra = nn.Linear(2, 2)  # runs last, its output is discarded below

        def forward(self, x):
            logits = self.body(x)
            self.extra(logits)
            return logits

    torch.manual_seed(0)
    model = TwoHeads().eval()
    x = torch.randn(2, 1, 12, 12)
    original = explain_maps(Explainer(model), x, MethodVariant("gradient"), targets=[0, 1])
    stages = cascade_stages(model, x)
    assert stages[0].modules == ("extra",)
    cascade = cascading_randomisation(model, x, [original], make_explainer=Explainer, stages=stages[:1])["gradient"]
    assert cascade.metrics["spearman"][0] == pytest.approx([1.0, 1.0])
    assert cascade.metrics["ssim"][0] == pytest.approx([1.0, 1.0])


def test_alive_neurons_are_the_nonzero_activations(net):
    x = torch.randn(2, 3, 16, 16)
    layout, alive = alive_neurons(net, x)
    acts = []
    with torch.no_grad():
        h = torch.relu(net.stem_bn(net.stem(x)))
        acts.append(h)
        for block in net.blocks:
            h = block(h)
            acts.append(h)
    expected = torch.cat([(a != 0).flatten(1) for a in acts], dim=1)
    assert alive.shape == (2, layout.total)
    assert torch.equal(alive, expected)


def test_jaccard_and_its_chance_level():
    a = torch.tensor([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    b = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    assert jaccard(a, b).tolist() == [pytest.approx(1 / 3), 0.0, 1.0]
    assert chance_jaccard(np.array([0.3]), np.array([0.3]))[0] == pytest.approx(0.09 / 0.51)


def test_contribution_pathways_keep_no_dead_neuron_and_match_themselves(net):
    torch.manual_seed(3)
    x = torch.randn(3, 3, 16, 16)
    overlap = compare_selections(net, x, [0, 1, 2], [("contribution", {}), ("contribution", {"signed": True})],
                                 sparsity=0.6)
    reference, signed = overlap.selections
    assert reference.kept_dead_share.tolist() == [0.0, 0.0, 0.0]
    assert reference.jaccard_with_reference.tolist() == [1.0, 1.0, 1.0]
    assert signed.kept_dead_share.tolist() == [0.0, 0.0, 0.0]
    assert (reference.kept_fraction <= 0.4 + 1e-9).all()
    assert 0.0 < overlap.dead_share.mean() < 1.0


def test_method_variant_syntax_and_validation(net):
    v = MethodVariant.parse(" pathway_gradient@contribution:signed=true ")
    assert (v.method, v.selection, v.options) == ("pathway_gradient", "contribution", (("signed", "true"),))
    checked = v.validated(Explainer(net))
    assert checked.options == (("signed", True),)
    assert checked.label == "pathway_gradient@contribution:signed=true"
    assert MethodVariant.parse("gradient").label == "gradient"
    dense = MethodVariant.parse("pathway_gradient:sparsity=0.9").validated(Explainer(net))
    assert dense.sparsity == 0.9 and dense.label == "pathway_gradient:sparsity=0.9"
    for bad, message in [("nope", "unknown explanation method"), ("gradient@contribution", "takes no selection"),
                         ("pathway_gradient@nope", "unknown pathway selection"),
                         ("pathway_gradient:signed", "NAME=VALUE"), ("gradient:sparsity=0.5", "no sparsity"),
                         ("pathway_gradient:sparsity=high", "sparsity must be a number")]:
        with pytest.raises(InvalidOption, match=message):
            MethodVariant.parse(bad)
    with pytest.raises(InvalidOption, match="signed"):
        MethodVariant.parse("pathway_gradient:signed=maybe").validated(Explainer(net))
    with pytest.raises(InvalidOption, match="does not apply"):
        MethodVariant.parse("gradient:steps=3").validated(Explainer(net))
    with pytest.raises(InvalidOption, match="sparsity must be in"):
        MethodVariant.parse("pathway_gradient:sparsity=1").validated(Explainer(net))


def test_all_variants_cover_every_method_and_every_selection_of_pathway_methods():
    from handler.engine import METHODS

    labels = [v.label for v in all_variants()]
    for name in METHODS.names():
        if METHODS.get(name).uses_pathway:
            assert all(f"{name}@{s}" in labels for s in SELECTIONS.names())
        else:
            assert name in labels


def test_maps_come_from_the_explainer_and_relevance_is_their_magnitude(net):
    x = torch.randn(3, 3, 16, 16)
    explainer = Explainer(net)
    maps = explain_maps(explainer, x, MethodVariant("pathway_gradient"), targets=[2, 1, 0], sparsity=0.5,
                        batch_size=2)
    direct = explainer.explain(x, [2, 1, 0], method="pathway_gradient", sparsity=0.5)
    assert np.allclose(maps.attribution, np.stack([e.attribution for e in direct]), atol=1e-6)
    assert maps.targets.tolist() == [2, 1, 0]
    assert np.array_equal(maps.relevance, np.abs(maps.attribution))
    assert all(p["requested_sparsity"] == 0.5 for p in maps.pathways)
    denser = explain_maps(explainer, x, MethodVariant("pathway_gradient", sparsity=0.9), sparsity=0.5)
    assert all(p["requested_sparsity"] == 0.9 for p in denser.pathways)


def test_a_random_pathway_keeps_dead_neurons_in_proportion_and_overlaps_by_chance(net):
    torch.manual_seed(4)
    x = torch.randn(2, 3, 16, 16)
    overlap = compare_selections(net, x, [0, 1], [("contribution", {}), ("random", {"seed": 1})], sparsity=0.5)
    random = overlap.selections[1]
    assert random.kept_dead_share == pytest.approx(overlap.dead_share, abs=0.05)
    assert random.jaccard_with_reference == pytest.approx(random.chance_jaccard, abs=0.05)
