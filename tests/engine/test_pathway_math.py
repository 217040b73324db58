"""The pathway and pathway gradient on networks small enough to work out by hand, and their invariants."""

import math

import pytest
import torch
from torch import nn

from handler.engine import METHODS, run_along
from handler.engine.pathways import SELECTIONS
from handler.engine.threshold import keep_above_quantile
from tiny_models import ResidualPoolCNN


def hand_network() -> nn.Module:
    """x ∈ R³ → Linear(3→4) → ReLU → Linear(4→2), weights chosen so every quantity is a small integer."""
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)).double().eval()
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1, 0, 0], [0, 2, 0], [0, 0, -1], [1, -1, 1]], dtype=torch.float64))
        net[0].bias.copy_(torch.tensor([0.5, 0, 0, 0], dtype=torch.float64))
        net[2].weight.copy_(torch.tensor([[1, -1, 3, 2], [0, 1, 0, 0]], dtype=torch.float64))
        net[2].bias.zero_()
    return net.requires_grad_(False)


X = torch.ones(1, 3, dtype=torch.float64)  # pre-activations [1.5, 2, -1, 1] -> a = [1.5, 2, 0, 1]


def test_hand_network_contributions_pathway_and_gradient():
    net = hand_network()
    pathway = SELECTIONS.get("contribution")(net, X, torch.tensor([0]), [0.5])
    # logit_0 = a·[1, -1, 3, 2]: contributions |a ⊙ g| = [1.5, 2, 0, 2]; the 0.5-quantile is 1.5,
    # so neurons scoring > 1.5 survive: the 2nd and the 4th.
    assert pathway.keep.tolist() == [[False, True, False, True]]
    assert pathway.realised_sparsity().tolist() == [0.5]
    out = METHODS.get("pathway_gradient")(net, X, torch.tensor([0]), sparsity=[0.5])
    # ∂logit'_0/∂x = -1·[0, 2, 0] + 2·[1, -1, 1]
    assert out.maps.tolist() == [[2.0, -4.0, 2.0]]
    # the pathway's own logit: -1·2 + 2·1 = 0; the full network's: 1.5 - 2 + 0 + 2 = 1.5
    assert out.pathway_logits[0, 0].item() == 0.0
    assert out.logits[0, 0].item() == 1.5


def test_hand_network_vanilla_gradient():
    out = METHODS.get("gradient")(hand_network(), X, torch.tensor([0]))
    assert out.maps.tolist() == [[3.0, -4.0, 2.0]]


def test_default_target_is_the_predicted_class_not_class_zero():
    out = METHODS.get("pathway_gradient")(hand_network(), X, torch.tensor([-1]), sparsity=[0.5])
    assert out.targets.tolist() == [1]  # logits [1.5, 2]


def test_ties_at_the_threshold_are_removed_so_realised_sparsity_can_exceed_requested():
    pathway = SELECTIONS.get("contribution")(hand_network(), X, torch.tensor([0]), [0.75])
    # scores [1.5, 2, 0, 2]: the 0.75-quantile is 2 and both 2s tie with it
    assert pathway.keep.tolist() == [[False, False, False, False]]
    assert pathway.realised_sparsity().item() == 1.0


@pytest.mark.parametrize("p", [0.0, 0.1, 0.33, 0.5, 0.7, 0.9, 0.99])
def test_realised_sparsity_is_at_least_requested(p):
    torch.manual_seed(1)
    scores = torch.rand(3, 1000)
    scores[:, :200] = 0  # dead neurons tie at zero
    keep = keep_above_quantile(scores, [p, p, p])
    realised = 1 - keep.double().mean(1)
    assert (realised >= p - 1e-9).all()
    if p >= 0.2:  # above the dead block the threshold is exact: no more than one extra removal
        assert (realised <= p + 1 / 1000 + 1e-9).all()


def test_per_sample_sparsity_thresholds_each_row_separately():
    torch.manual_seed(2)
    scores = torch.rand(2, 500)
    keep = keep_above_quantile(scores, [0.2, 0.8])
    assert keep[0].sum().item() == 400
    assert keep[1].sum().item() == 100


def test_sparsity_zero_is_exactly_the_vanilla_gradient(small_cnn):
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    vanilla = METHODS.get("gradient")(small_cnn, x, torch.tensor([-1, 3]))
    pathway = METHODS.get("pathway_gradient")(small_cnn, x, torch.tensor([-1, 3]), sparsity=[0.0, 0.0])
    assert torch.equal(vanilla.maps, pathway.maps)
    assert pathway.pathway.keep.all()


def test_pathway_is_exactly_linear_in_a_small_ball(small_cnn):
    """With the masks fixed, logit'(x + δ) - logit'(x) = ∇·δ for small δ (float64)."""
    torch.manual_seed(3)
    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    out = METHODS.get("pathway_gradient")(small_cnn, x, torch.tensor([-1]), sparsity=[0.7])
    c = out.targets[0]
    base = run_along(small_cnn, x, out.pathway)[0, c]
    for scale in (1e-6, 1e-5, 1e-4):
        delta = torch.randn_like(x)
        delta *= scale / delta.norm()
        moved = run_along(small_cnn, x + delta, out.pathway)[0, c]
        predicted = (out.maps * delta).sum()
        assert math.isclose((moved - base).item(), predicted.item(), rel_tol=1e-7, abs_tol=1e-15)


def test_batch_gives_the_same_maps_as_samples_one_by_one(small_cnn):
    torch.manual_seed(4)
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    targets = torch.tensor([-1, 2, 7])
    sparsity = [0.5, 0.7, 0.9]
    batch = METHODS.get("pathway_gradient")(small_cnn, x, targets, sparsity=sparsity)
    for b in range(3):
        one = METHODS.get("pathway_gradient")(small_cnn, x[b:b + 1], targets[b:b + 1], sparsity=[sparsity[b]])
        assert torch.equal(one.pathway.keep[0], batch.pathway.keep[b])
        torch.testing.assert_close(one.maps[0], batch.maps[b], rtol=1e-10, atol=1e-12)
        assert one.targets.item() == batch.targets[b].item()


def test_pathway_run_refuses_a_pathway_from_different_sites(small_cnn):
    from handler.engine import SiteMismatchError

    x = torch.randn(1, 3, 32, 32, dtype=torch.float64)
    out = METHODS.get("pathway_gradient")(small_cnn, x, torch.tensor([-1]), sparsity=[0.5])
    with pytest.raises(SiteMismatchError):
        run_along(small_cnn, torch.randn(1, 3, 16, 16, dtype=torch.float64), out.pathway)
    other = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 30 * 30, 10)).double()
    with pytest.raises(SiteMismatchError):
        run_along(other, x, out.pathway)


@pytest.fixture
def small_cnn():
    """Conv-ReLU-pool stack with an in-place ReLU module called twice and a functional relu."""
    torch.manual_seed(0)
    return ResidualPoolCNN().double().eval()


@pytest.mark.parametrize("target, kind", [("9" * 5000, "target_out_of_range"), ("-" + "9" * 40, "target_out_of_range"),
                                          ("²", "unknown_label"), ("٣", "unknown_label")])
def test_target_strings_that_look_numeric_get_a_clear_error_not_a_crash(target, kind):
    from handler.engine import Explainer
    from handler.errors import InvalidTarget

    explainer = Explainer(hand_network())
    assert explainer.resolve_target(" 1 ") == 1
    with pytest.raises(InvalidTarget) as raised:
        explainer.resolve_target(target)
    assert raised.value.code == kind
