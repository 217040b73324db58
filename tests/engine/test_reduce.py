"""Channel reductions: max_abs keeps the signed value of largest magnitude, the first channel on ties."""

import torch

from handler.engine.reduce import REDUCTIONS


def test_max_abs_matches_argmax_gather_including_ties():
    torch.manual_seed(0)
    for shape in [(4, 3, 20, 20), (2, 1, 8, 8), (2, 5, 7, 7)]:
        maps = torch.randn(*shape, dtype=torch.float64)
        maps[:, :, :5] = torch.randint(-2, 3, maps[:, :, :5].shape).double()  # ties, zeros, x and -x
        expected = maps.gather(1, maps.abs().argmax(dim=1, keepdim=True)).squeeze(1)
        assert torch.equal(REDUCTIONS.get("max_abs")(maps), expected)


def test_max_abs_by_hand():
    maps = torch.tensor([[[[1.0]], [[-3.0]], [[2.0]]], [[[-2.0]], [[2.0]], [[0.5]]]])
    assert REDUCTIONS.get("max_abs")(maps).flatten().tolist() == [-3.0, -2.0]  # a tie keeps the first channel
