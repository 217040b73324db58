"""The service, the one request boundary: one validation step, a job per request, failures isolated per job."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from handler.engine import METHODS, OptionSpec, ValidRequest, register_method
from handler.errors import ExplainError, InvalidOption
from handler.serving.responses import http_status


def test_validation_types_checks_and_resolves_the_target_once(lite0_service):
    # pathway_gradient: sparsity applies to it (a method without a pathway records none, tested below)
    [checked] = lite0_service.validate([{"target": "espresso", "sparsity": "0.5", "method": "pathway_gradient"}],
                                       explain=True)
    assert isinstance(checked.request, ValidRequest)
    assert checked.request.class_index == 967 and checked.request.sparsity == 0.5
    assert checked.request.method == "pathway_gradient" and checked.request.reduce == "max_abs"


@pytest.mark.parametrize("raw", [{"sparsity": "1.5"}, {"sparsity": 1.5}])
def test_one_sparsity_rule_whichever_way_the_value_arrives(lite0_service, raw):
    from handler.service import request_of

    with pytest.raises(InvalidOption) as from_text:
        lite0_service.validate([raw], explain=True)
    with pytest.raises(InvalidOption) as from_engine:  # the engine's own check, reached without the schema
        lite0_service.explainer.validate(replace(request_of(lite0_service.validate([{}], explain=True)[0].options),
                                                 sparsity=1.5))
    assert str(from_text.value) == str(from_engine.value) == "sparsity must be in [0, 1), got 1.5"
    assert from_text.value.code == from_engine.value.code == "invalid_sparsity"


def test_the_engine_runs_validated_requests_without_checking_them_again(lite0_service, coffee, monkeypatch):
    job = lite0_service.prepare([coffee], [{"method": "gradient", "target": 281, "outputs": "pathway"}],
                                explain=True)
    assert job.error is None

    def no_second_check(request):
        raise AssertionError(f"validated twice: {request}")

    monkeypatch.setattr(lite0_service.explainer, "validate", no_second_check)
    lite0_service.run([job])
    assert job.error is None
    assert job.results[0].document["explanation"]["target"]["index"] == 281


def test_a_request_error_is_in_its_job_never_raised(lite0_service):
    job = lite0_service.prepare([b"not an image"], [{}], explain=False)
    assert job.error is not None and job.error.code == "not_an_image" and job.images == []
    job = lite0_service.prepare([b"x"], [{"target": "unicorn"}], explain=False)
    assert job.error.code == "unknown_label"  # options are checked before any decoding


@pytest.fixture
def method_with_an_unusual_costly_option():
    """A method whose costly option has a name no cap or table knows: its declared cost still counts."""
    name = "test_rollout_method"
    register_method(name, options={"rollouts": OptionSpec(int, 10, minimum=1, passes=3)})(
        lambda model, x, targets, **options: None)
    yield name
    METHODS._entries.pop(name)


def test_pass_budget_is_computed_from_the_options_declared_costs(lite0_service, method_with_an_unusual_costly_option):
    service, method = lite0_service, method_with_an_unusual_costly_option
    [checked] = service.validate([{"method": method, "rollouts": 7}], explain=True)
    assert service.explanation_passes(checked.request) == 2 + 3 * 7
    [default] = service.validate([{"method": method}], explain=True)
    assert service.explanation_passes(default.request) == 2 + 3 * 10
    saved = service.limits
    service.limits = replace(saved, max_passes_per_request=100)
    try:
        with pytest.raises(InvalidOption) as refused:
            service.validate([{"method": method, "rollouts": 17}] * 2, explain=True)  # 2 x (2 + 51) = 106
        assert refused.value.code == "over_limit" and "106 forward/backward passes" in refused.value.message
        service.validate([{"method": method, "rollouts": 17}] * 2, explain=False)  # predictions cost no passes
    finally:
        service.limits = saved


def test_the_archives_pass_budget_bounds_the_neuron_integrated_gradient_selection(lite0_service):
    """Its cost grows with the activation sites, which no per-option cap can know: the pass budget (50 sites
    per step) admits the default 10 steps under the archive's 1000 passes and refuses 20."""
    from handler.serving.archive import DEFAULT_PATHWAY_CONFIG

    service = lite0_service
    asked = {"selection": "neuron_integrated_gradients"}
    [default] = service.validate([asked], explain=True)
    assert service.explanation_passes(default.request) == 2 + 50 * 10
    saved = service.limits
    service.limits = replace(saved, max_passes_per_request=DEFAULT_PATHWAY_CONFIG["limits"]["max_passes_per_request"])
    try:
        service.validate([asked], explain=True)
        with pytest.raises(InvalidOption) as refused:
            service.validate([dict(asked, steps=20)], explain=True)
        assert refused.value.code == "over_limit" and "1002 forward/backward passes" in refused.value.message
    finally:
        service.limits = saved


def test_archive_caps_come_from_the_declarations():
    from handler.serving.archive import DEFAULT_PATHWAY_CONFIG, declared_caps

    assert DEFAULT_PATHWAY_CONFIG["limits"]["method_caps"] == declared_caps()
    assert declared_caps() == {"steps": 128, "samples": 64, "iterations": 120, "copies": 64}


def test_a_bug_in_one_request_is_an_internal_error_logged_with_its_traceback(lite0_service, coffee, monkeypatch,
                                                                             caplog):
    service = lite0_service
    original = service.explainer.explain_requests

    def explain_requests(x, requests):
        if any(r.class_index == 285 for r in requests):
            raise ZeroDivisionError("a bug met only by class 285")
        return original(x, requests)

    monkeypatch.setattr(service.explainer, "explain_requests", explain_requests)
    jobs = [service.prepare([coffee], [{"method": "gradient", "target": t, "outputs": "pathway"}], explain=True)
            for t in (281, 285)]
    with caplog.at_level(logging.ERROR):
        service.run(jobs)
    assert jobs[0].error is None and jobs[0].results[0].document["explanation"]["target"]["index"] == 281
    error = jobs[1].error
    assert error.code == "internal_error" and http_status(error) == 500 and "ZeroDivisionError" in error.message
    assert "Traceback" in caplog.text and "a bug met only by class 285" in caplog.text


def test_a_failed_prediction_is_called_a_prediction(lite0_service, coffee, monkeypatch):
    service = lite0_service

    def probabilities(x):
        raise ZeroDivisionError("a bug in the predict path")

    monkeypatch.setattr(service, "probabilities", probabilities)
    [job] = [service.prepare([coffee], [{}], explain=False)]
    service.run([job])
    assert job.error.code == "internal_error"
    assert job.error.message == "the prediction failed: ZeroDivisionError: a bug in the predict path"


def test_each_error_code_has_one_status():
    from handler.errors import BadRequest, ImageTooLarge, InternalError, OutOfMemory, UnknownModel

    assert [http_status(e) for e in (InvalidOption("x"), BadRequest("x", code="too_many_instances"),
                                     InvalidOption("x", code="method_not_allowed"), ImageTooLarge("x"),
                                     UnknownModel("x"), OutOfMemory("x"), InternalError("x"))] == \
        [400, 413, 403, 413, 404, 507, 500]
    assert not hasattr(ExplainError("x"), "status")


@pytest.fixture(scope="module")
def phone_sized_coffee(photos) -> bytes:
    """The coffee photo at 4800 x 3200 as a JPEG: a large upload, decoded at half its size by default."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.open(photos["coffee"]).convert("RGB").resize((4800, 3200), Image.BICUBIC).save(buffer, "JPEG", quality=92)
    return buffer.getvalue()


def test_a_large_jpeg_is_explained_from_a_reduced_decode_and_documented_at_its_full_size(
        lite0_service, phone_sized_coffee):
    import io
    import json

    from PIL import Image

    from handler import ExplanationService
    from handler.models import get_spec

    spec = get_spec("efficientnet_lite0")
    full_decode = ExplanationService.from_spec(
        replace(spec, preprocessing=replace(spec.preprocessing, jpeg_draft=False)), device="cpu")
    assert lite0_service.decode(phone_sized_coffee).size == (2400, 1600)  # 1/4 would go below 4 x 256
    assert full_decode.decode(phone_sized_coffee).size == (4800, 3200)

    [reduced] = lite0_service.explain_images([phone_sized_coffee], outputs="heatmap,overlay")
    [full] = full_decode.explain_images([phone_sized_coffee], outputs="heatmap,overlay")
    seen, reference = reduced.document["preprocessing"], full.document["preprocessing"]
    assert seen["jpeg_draft"] is True and reference["jpeg_draft"] is False
    assert seen["image_size"] == reference["image_size"] == [4800, 3200] and seen["decoded_size"] == [2400, 1600]
    assert all(abs(a - b) <= 2.0 for a, b in zip(seen["crop_box"], reference["crop_box"]))
    # drawn on the full photo, scaled to the overlay pixel cap exactly as the full decode's is
    scale = (lite0_service.limits.max_overlay_pixels / (4800 * 3200)) ** 0.5
    overlay_size = Image.open(io.BytesIO(reduced.artifacts["overlay"])).size
    assert overlay_size == Image.open(io.BytesIO(full.artifacts["overlay"])).size == (round(4800 * scale),
                                                                                     round(3200 * scale))
    assert reduced.document["explanation"]["overlay_size"] == list(overlay_size)
    # the same prediction, to the second decimal
    top, top_full = reduced.document["predictions"][0], full.document["predictions"][0]
    assert top["index"] == top_full["index"] == 967 and abs(top["probability"] - top_full["probability"]) < 0.01
    [predicted] = lite0_service.predict([lite0_service.decode(phone_sized_coffee)],
                                        [lite0_service.validate([{}], explain=False)[0].options])
    assert predicted["predictions"][0]["index"] == 967
    assert abs(predicted["predictions"][0]["probability"] - top["probability"]) < 1e-4  # both routes decode alike
    # and the record says how it was decoded, so the explanation verifies from the bytes sent
    document = json.loads(json.dumps(reduced.inline()))
    verified = lite0_service.verify(document, phone_sized_coffee)
    assert verified.ok, verified.message
    assert full_decode.verify(document, phone_sized_coffee).differences[0] == "preprocessing"


def test_pathway_options_sent_with_a_method_without_a_pathway_are_noted_as_unused(lite0_service, photos):
    [result] = lite0_service.explain_images([photos["coffee"]], method="gradient", sparsity=0.5, selection="random")
    document = result.inline()
    assert document["explanation"]["notes"] == [
        "sparsity and selection apply to methods that follow a pathway; gradient follows none, so they were not used"]
    assert lite0_service.validate([{"method": "gradient", "sparsity": 0.5}], explain=True)[0].request.sparsity is None
    recorded = document["provenance"]["options"]  # as sent, so that the recomputation notes them the same way
    assert recorded["sparsity"] == 0.5 and recorded["selection"] == "random"
    assert lite0_service.verify(document, photos["coffee"].read_bytes()).ok
    [plain] = lite0_service.explain_images([photos["coffee"]], method="gradient")
    assert plain.document["explanation"]["notes"] == [] and plain.attribution.tobytes() == result.attribution.tobytes()
    with pytest.raises(ExplainError) as info:  # a misspelt selection is still an error
        lite0_service.explain_images([photos["coffee"]], method="gradient", selection="randon")
    assert info.value.code == "unknown_selection"
