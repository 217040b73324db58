"""A model built to defeat the engine: a typed, one-line refusal everywhere, never a traceback.

``BatchPlusOne`` appends a learned row to the batch before its ReLU, so that call's leading dimension is
``B + 1``: neither per sample, nor ``k`` x the batch, nor shared by it. The engine cannot give its neurons
to samples and says so (``unsupported_model``, naming the call and its operation) through the Python API,
the CLI and the TorchServe handler, whose other requests in the same batch are unaffected.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from handler.engine import Explainer
from handler.engine.explainer import NotAClassifier
from handler.errors import UnsupportedModel
from handler.models.architectures import ARCHITECTURES
from handler.serving.responses import http_status


class BatchPlusOne(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.extra = nn.Parameter(torch.randn(1, 4))
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        pooled = self.conv(x).mean(dim=(2, 3))
        rows = torch.relu(torch.cat([pooled, self.extra]))  # [B + 1, 4]
        return self.fc(rows[:-1] + rows[-1:])


class ZeroHead(nn.Module):
    """A ReLU network whose classifier is zero-initialised: no logit depends on the input."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, 10)
        nn.init.zeros_(self.fc.weight)

    def forward(self, x):
        return self.fc(self.features(x))


class NarrowWaist(nn.Module):
    """A chain through a one-neuron ReLU layer whose activation is tiny at ``x`` (its bias nearly cancels its
    input there), so its contribution ranks below most of the wide layer's and a high threshold removes it,
    cutting every path from the input to the logits."""

    def __init__(self, x: torch.Tensor):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.waist = nn.Linear(16, 1)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(1, 10)
        with torch.no_grad():
            self.waist.weight.fill_(1.0)
            drive = self.waist.weight @ self.relu1(self.conv(x)).mean(dim=(2, 3))[0]
            self.waist.bias.copy_(-drive * (1 - 1e-5))

    def forward(self, x):
        return self.fc(self.relu2(self.waist(self.relu1(self.conv(x)).mean(dim=(2, 3)))))


def test_engine_refuses_a_call_it_cannot_give_to_samples_naming_the_call_and_the_operation():
    with pytest.raises(UnsupportedModel, match=r"activation call 0 \(relu\).*leading dimension 2 for one sample "
                                               r"and 3 for two") as caught:
        Explainer(BatchPlusOne()).explain(torch.randn(2, 3, 16, 16))
    assert caught.value.code == "unsupported_model" and http_status(caught.value) == 501


class TokenEncoder(nn.Module):
    """An encoder without a classification head: ``[B, tokens, features]`` (as timm's ``*_enc`` models), or a
    tuple of two tensors (as a model with an auxiliary output)."""

    def __init__(self, as_tuple: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 4, stride=4)
        self.as_tuple = as_tuple

    def forward(self, x):
        tokens = torch.relu(self.conv(x)).flatten(2).transpose(1, 2)
        return (tokens.mean(1), tokens.amax(1)) if self.as_tuple else tokens


@pytest.mark.parametrize("as_tuple, described", [(False, r"a tensor of shape \[[12], 16, 8\]"),
                                                  (True, r"a tuple of 2 \(a tensor of shape \[[12], 8\], ")])
def test_engine_refuses_a_model_that_is_not_a_classifier_naming_its_output(as_tuple, described):
    explainer = Explainer(TokenEncoder(as_tuple).eval())
    x = torch.randn(2, 3, 16, 16)
    for call in (lambda: explainer.explain(x), lambda: explainer.predict(x)):
        with pytest.raises(NotAClassifier, match=rf"the model returns {described}.*one \[batch, classes\] tensor "
                                                 r"of logits") as caught:
            call()
        assert caught.value.code == "unsupported_model" and http_status(caught.value) == 501
        assert "\n" not in str(caught.value)


def test_loading_a_model_that_is_not_a_classifier_fails_at_load_naming_its_output(monkeypatch):
    from handler.models import ModelLoadError, load_model, spec_for_architecture

    monkeypatch.setitem(ARCHITECTURES._entries, "token_encoder", lambda num_classes=None: TokenEncoder())
    with pytest.raises(ModelLoadError, match=r"'handler:token_encoder' is not a classifier: the model returns a "
                                             r"tensor of shape \[1, 3136, 8\]"):
        load_model(spec_for_architecture("handler:token_encoder", labels=None))


def test_a_zero_map_says_the_target_does_not_depend_on_the_input():
    [explanation] = Explainer(ZeroHead().eval()).explain(torch.randn(1, 3, 16, 16), sparsity=0.5)
    assert explanation.attribution_scale == 0
    assert explanation.pathway["kept_neurons"] == 0
    assert any("does not depend on the input" in note and "zero-initialised" in note for note in explanation.notes)


def test_a_zero_map_names_the_sites_the_threshold_removed_entirely():
    x = torch.rand(1, 3, 16, 16)
    model = NarrowWaist(x).eval()
    [explanation] = Explainer(model).explain(x, sparsity=0.7)
    assert explanation.attribution_scale == 0
    assert explanation.pathway["removed_sites"] == ["relu2"]
    [note] = [n for n in explanation.notes if "zero" in n]
    assert "removed every neuron of 1 site(s) (relu2)" in note
    [everything] = Explainer(model).explain(x, sparsity=0.0)
    assert everything.attribution_scale > 0 and everything.pathway["removed_sites"] == []


def test_cli_ends_with_one_line_naming_the_image_and_the_cause(tmp_path, photos, monkeypatch, capsys):
    from handler.cli import main

    monkeypatch.setitem(ARCHITECTURES._entries, "batch_plus_one", lambda num_classes=None: BatchPlusOne(1000))
    with pytest.raises(SystemExit) as exited:
        main(["--out", str(tmp_path), "--arch", "handler:batch_plus_one", str(photos["coffee"])])
    assert exited.value.code != 0
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert str(photos["coffee"]) in lines[0] and "activation call 0 (relu)" in lines[0]
    assert "Traceback" not in err


def test_cli_turns_an_unforeseen_failure_into_one_line(tmp_path, photos, monkeypatch, capsys):
    from handler import cli

    def broken(*_args, **_kwargs):
        raise KeyError("something nobody foresaw")

    monkeypatch.setattr(cli.ExplanationService, "from_spec", broken)
    with pytest.raises(SystemExit) as exited:
        cli.main(["--out", str(tmp_path), str(photos["coffee"])])
    assert exited.value.code == 3  # the README's exit status for an internal error
    err = capsys.readouterr().err
    assert err.strip().splitlines() == ["pathway-explain: internal error: KeyError: 'something nobody foresaw' "
                                        "(PATHWAY_DEBUG=1 shows the traceback)"]


def test_handler_answers_unsupported_model_and_serves_the_batch_neighbours(coffee, monkeypatch, tmp_path):
    """The real TorchServe handler (fake context, as in test_handler_resilience) with the engine's model
    swapped for one that defeats it: each explanation is a 501 ``unsupported_model`` naming the call, never a
    500 ``internal_error``; the prediction in the same batch is answered."""
    import yaml
    from serving.test_handler_resilience import FakeContext, RecordingCache

    from handler.models import get_spec
    from handler.serving import handler as handler_module
    from handler.serving.archive import DEFAULT_PATHWAY_CONFIG, DEFAULT_WORKER_CONFIG, stage_archive
    from handler.serving.metrics import SPEC_FILE, server_metrics_config

    stage = tmp_path
    stage_archive(get_spec("efficientnet_lite0"), stage, DEFAULT_WORKER_CONFIG, DEFAULT_PATHWAY_CONFIG)
    config = yaml.safe_load((stage / "model-config.yaml").read_text())
    metrics = stage / "server-metrics.yaml"
    metrics.write_text(yaml.safe_dump(server_metrics_config([yaml.safe_load(SPEC_FILE.read_text())])))
    h = handler_module.PathwayHandler()
    h.initialize(FakeContext([{}], stage, config, RecordingCache(metrics)))
    explainer = h.service.explainer
    monkeypatch.setattr(explainer, "model", BatchPlusOne(1000).eval())

    headers = [{"explain": "True"}, {"explain": "True", "X-Explain-Sparsity": "0.5"}, {}]
    ctx = FakeContext(headers, stage, config, RecordingCache(metrics))
    out = h.handle([{"body": bytearray(coffee)}] * 3, ctx)
    assert ctx.status == {0: 501, 1: 501}  # both explanations refused, the prediction beside them answered
    for body in out[:2]:
        error = json.loads(body)
        assert error["type"] == "unsupported_model" and "activation call 0 (relu)" in error["message"]
    assert np.isfinite(json.loads(out[2])["predictions"][0]["probability"])


class FivesOnly(nn.Module):
    """A classifier with a bare size assertion (as HaloNet's): it runs only on sides that are multiples of 5."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        assert x.shape[-1] % 5 == 0
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def test_a_model_that_fails_on_its_own_input_size_fails_at_load_and_the_engine_refuses_it_typed(monkeypatch):
    """A model that cannot run on the crop its preprocessing makes (224, not a multiple of 5) would fail every
    request: it fails at load, one line naming the size and the cause. Given to the engine directly, it explains
    where it runs, and elsewhere the refusal is typed (the explainer's first-call checks included)."""
    from handler.models import ModelLoadError, load_model, spec_for_architecture

    monkeypatch.setitem(ARCHITECTURES._entries, "fives_only", lambda num_classes=None: FivesOnly(10))
    with pytest.raises(ModelLoadError, match=r"^'handler:fives_only' fails on a 224x224 image, the size its "
                                             r"preprocessing makes \(preprocessing.crop\): AssertionError(: .*)?$"):
        load_model(spec_for_architecture("handler:fives_only", labels=None))
    model = FivesOnly(10).eval()
    [explanation] = Explainer(model).explain(torch.randn(1, 3, 35, 35), sparsity=0.5)
    assert explanation.attribution.shape == (35, 35)
    with pytest.raises(UnsupportedModel, match=r"pathway_gradient cannot explain this model: AssertionError"):
        Explainer(model).explain(torch.randn(1, 3, 32, 32))
