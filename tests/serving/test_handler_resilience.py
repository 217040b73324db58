"""The TorchServe handler without a server: a fake TorchServe context around the real handler, real model
(CPU) and TorchServe's own metric cache. Out-of-memory splitting, envelope rows and metric declarations."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
from collections import defaultdict

import pytest
import torch
import yaml

from handler.engine import BatchSplit
from handler.engine.events import report_split
from handler.serving import handler as handler_module
from handler.serving import requests as requests_module
from handler.serving.metrics import SPEC_FILE, HandlerMetrics, load_specs, server_metrics_config
from handler.serving.requests import envelope_of, parse_envelope

MODEL = "efficientnet_lite0"


class RecordingCache:
    """TorchServe's worker metric cache (built from the merged server config), recording what it is given."""

    def __init__(self, config_path):
        from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl

        self.cache = MetricsCacheYamlImpl(config_file_path=str(config_path))
        self.cache.initialize_cache()
        self.cache.model_name = MODEL
        self.records = []

    def add_metric(self, name, value, unit, idx=None, dimensions=None, metric_type=None):
        self.records.append((name, value, {d.name: d.value for d in dimensions}))
        self.cache.add_metric(name, value, unit, idx, dimensions, metric_type)

    def values(self, name, **labels):
        return [v for n, v, dims in self.records if n == name and all(dims.get(k) == w for k, w in labels.items())]


class FakeContext:
    """The parts of ts.context.Context the handler uses."""

    def __init__(self, headers, model_dir, config, metrics):
        self.headers = headers
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": None}
        self.model_yaml_config = config
        self.model_name = MODEL
        self.metrics = metrics
        self.request_ids = {i: f"req-{i}" for i in range(len(headers))}
        self.status, self.content_type, self.response_headers = {}, {}, defaultdict(dict)

    def get_all_request_header(self, i):
        return self.headers[i]

    def get_request_id(self, i=0):
        return self.request_ids[i]

    def set_response_status(self, code=200, phrase="", idx=0):
        self.status[idx] = code

    def set_response_content_type(self, idx, value):
        self.content_type[idx] = value

    def set_response_header(self, idx, key, value):
        self.response_headers[idx][key] = value


@pytest.fixture(scope="module")
def staged(tmp_path_factory):
    """An unpacked archive (what TorchServe extracts) and the merged server metrics configuration."""
    from handler.models import get_spec
    from handler.serving.archive import DEFAULT_PATHWAY_CONFIG, DEFAULT_WORKER_CONFIG, stage_archive

    stage = tmp_path_factory.mktemp("unpacked")
    stage_archive(get_spec(MODEL), stage, DEFAULT_WORKER_CONFIG, DEFAULT_PATHWAY_CONFIG)
    config = yaml.safe_load((stage / "model-config.yaml").read_text())
    metrics_config = stage / "server-metrics.yaml"
    metrics_config.write_text(yaml.safe_dump(server_metrics_config([yaml.safe_load(SPEC_FILE.read_text())])))
    return stage, config, metrics_config


@pytest.fixture(scope="module")
def initialized(staged):
    """A handler initialised the way TorchServe does it (once: the model load is the slow part)."""
    stage, config, metrics_config = staged
    h = handler_module.PathwayHandler()
    h.initialize(FakeContext([{}], stage, config, RecordingCache(metrics_config)))
    return h


@pytest.fixture
def served(initialized, staged):
    """(handler, make_context, metric cache) with a fresh metric cache for this test."""
    stage, config, metrics_config = staged
    cache = RecordingCache(metrics_config)
    initialized.metrics.sink = cache

    def context(headers):
        return FakeContext(headers, stage, config, cache)

    return initialized, context, cache


def explain_headers(**options):
    return {"explain": "True", **{f"X-Explain-{k}": str(v) for k, v in options.items()}}


def out_of_memory_above(explainer, size):
    """Make the engine fail like a GPU out of memory for batches larger than ``size``."""
    original = explainer.explain_requests

    def explain_requests(x, requests):
        if x.shape[0] > size:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        return original(x, requests)

    return explain_requests


def test_batch_that_runs_out_of_memory_is_split_and_every_request_answered(served, coffee, monkeypatch, caplog):
    h, context, cache = served
    monkeypatch.setattr(h.service.explainer, "explain_requests", out_of_memory_above(h.service.explainer, 1))
    headers = [explain_headers(Method="gradient", Target=t) for t in (281, 967, 285)]
    ctx = context(headers)
    out = h.handle([{"body": bytearray(coffee)}] * 3, ctx)
    assert ctx.status == {}  # nobody failed
    assert [json.loads(body)["explanation"]["target"]["index"] for body in out] == [281, 967, 285]
    assert cache.values("pathway_oom_splits_total", source="handler") == [1]
    assert "Failed to update metric" not in caplog.text


def test_request_that_runs_out_of_memory_alone_gets_507_and_its_batch_neighbours_succeed(served, coffee, monkeypatch):
    h, context, cache = served
    explainer = h.service.explainer
    original = explainer.explain_requests

    def explain_requests(x, requests):  # the request with target 285 always runs out of memory
        if any(r.target == "285" for r in requests):
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 99 GB")
        return original(x, requests)

    monkeypatch.setattr(explainer, "explain_requests", explain_requests)
    ctx = context([explain_headers(Method="gradient", Target=t) for t in (281, 285)] + [{}])
    out = h.handle([{"body": bytearray(coffee)}] * 3, ctx)
    assert ctx.status == {1: 507}
    error = json.loads(out[1])
    assert error["type"] == "out_of_memory" and "CUDA" not in error["message"]
    assert json.loads(out[0])["explanation"]["target"]["index"] == 281
    assert json.loads(out[2])["predictions"][0]["label"] == "espresso"
    assert cache.values("pathway_rejected_requests_total", reason="out_of_memory", code="507") == [1]


@pytest.mark.parametrize("neighbours", [0, 1], ids=["alone", "in a batch"])
def test_request_error_found_only_while_running_is_a_400_alone_or_batched(served, coffee, neighbours):
    """A Grad-CAM layer name is checked against the model when the engine runs, not while parsing: the
    request still gets its 400 (not a 500), whether it was the only explain request or had neighbours."""
    h, context, cache = served
    headers = [{"explain": "True", "X-Explain-Method": "grad_cam", "X-Explain-Layer": "no.such.layer"}]
    headers += [explain_headers(Method="gradient", Outputs="pathway")] * neighbours
    ctx = context(headers)
    out = h.handle([{"body": bytearray(coffee)}] * len(headers), ctx)
    assert ctx.status == {0: 400}
    error = json.loads(out[0])
    assert error["type"] == "invalid_layer" and "no.such.layer" in error["message"]
    assert all(json.loads(body)["explanation"]["target"]["label"] == "espresso" for body in out[1:])


def test_prediction_with_a_bad_explanation_option_is_a_400_not_silently_ignored(served, coffee):
    h, context, cache = served
    headers = [{"X-Explain-Target": "unicorn"}, {"X-Explain-Method": "magic"}, {"X-Explain-Target": "espresso"}, {}]
    ctx = context(headers)
    out = h.handle([{"body": bytearray(coffee)}] * len(headers), ctx)
    assert ctx.status == {0: 400, 1: 400}
    assert [json.loads(out[i])["type"] for i in (0, 1)] == ["unknown_label", "unknown_method"]
    assert [json.loads(body)["predictions"][0]["label"] for body in out[2:]] == ["espresso", "espresso"]


def test_json_bodies_torchserve_could_not_decode_get_their_own_400(served, coffee):
    """TorchServe forwards the raw bytes when its json.loads fails: too deep, or an integer of 5000 digits
    (a ValueError, not a JSONDecodeError). Each is a 400 for its request only, never a failed batch."""
    h, context, cache = served
    json_headers = {"content-type": "application/json", "explain": "True"}
    bodies = [b"[" * 100_000 + b"]" * 100_000, b'{"image": "x", "top_k": ' + b"9" * 5000 + b"}", coffee]
    ctx = context([json_headers, json_headers, {}])
    out = h.handle([{"body": bytearray(b)} for b in bodies], ctx)
    assert ctx.status == {0: 400, 1: 400}
    assert "nested too deeply" in json.loads(out[0])["message"]
    assert "digits" in json.loads(out[1])["message"]
    assert json.loads(out[2])["predictions"][0]["label"] == "espresso"


def test_a_request_the_parser_did_not_foresee_is_a_400_not_a_failed_batch(served, coffee, monkeypatch):
    h, context, cache = served

    def broken(*args, **kwargs):
        raise KeyError("something no test imagined")

    monkeypatch.setattr(requests_module, "_parse_into", broken)
    ctx = context([{}])
    out = h.handle([{"body": bytearray(coffee)}], ctx)
    assert ctx.status == {0: 400} and json.loads(out[0])["type"] == "unreadable_request"


def test_an_option_value_int_cannot_read_is_a_400_for_its_request_and_its_neighbours_served(served, coffee):
    """"+-3" passed a lstrip("+-").isdigit() check that int() then refused: the ValueError failed the whole
    batch with TorchServe's 503, good neighbours included."""
    h, context, cache = served
    bad_json = {"image": {"b64": base64.b64encode(coffee).decode()}, "top_k": "²"}
    headers = [explain_headers(Method="gradient", **{"Top-K": "+-3"}), {"X-Explain-Explain-Top-K": "--2"},
               {"content-type": "application/json", "explain": "True"}, explain_headers(Method="gradient"), {}]
    bodies = [bytearray(coffee), bytearray(coffee), bad_json, bytearray(coffee), bytearray(coffee)]
    ctx = context(headers)
    out = h.handle([{"body": b} for b in bodies], ctx)
    assert ctx.status == {0: 400, 1: 400, 2: 400}
    assert all("must be an integer" in json.loads(out[i])["message"] for i in range(3))
    assert json.loads(out[3])["explanation"]["target"]["label"] == "espresso"
    assert json.loads(out[4])["predictions"][0]["label"] == "espresso"


def test_a_bug_met_while_preparing_one_request_fails_it_alone_as_an_internal_error(served, coffee, monkeypatch):
    h, context, cache = served
    decode = h.service.decode

    def fails_on_pngs_of_odd_length(data):
        if len(data) % 2:
            raise KeyError("something no test imagined")
        return decode(data)

    monkeypatch.setattr(h.service, "decode", fails_on_pngs_of_odd_length)
    odd = coffee if len(coffee) % 2 else coffee + b"\0"
    even = coffee + b"\0" if len(coffee) % 2 else coffee
    ctx = context([{}, {}])
    out = h.handle([{"body": bytearray(odd)}, {"body": bytearray(even)}], ctx)
    assert ctx.status == {0: 500}
    assert json.loads(out[0])["type"] == "internal_error" and "KeyError" in json.loads(out[0])["message"]
    assert json.loads(out[1])["predictions"][0]["label"] == "espresso"


def test_an_answer_larger_than_the_server_sends_is_refused_alone_saying_what_to_ask_for(served, coffee, monkeypatch):
    """TorchServe drops the worker's connection (a dead worker, its batch failed) when one answer exceeds
    max_response_size: such an answer is a typed 422 instead, and its neighbours are answered."""
    h, context, cache = served
    monkeypatch.setattr(h.service, "limits", dataclasses.replace(h.service.limits, max_response_bytes=150_000))
    headers = [explain_headers(Method="gradient", Outputs="heatmap,overlay"), explain_headers(Method="gradient"),
               {"explain": "True", "X-Explain-Method": "gradient", "accept": "image/png"}]
    ctx = context(headers)
    out = h.handle([{"body": bytearray(coffee)}] * 3, ctx)
    assert ctx.status == {0: 422, 2: 422}
    error = json.loads(out[0])
    assert error["type"] == "response_too_large" and "no overlay in JSON" in error["message"], error
    assert "max_response_bytes" in json.loads(out[2])["message"]
    assert len(out[1]) <= 150_000 and json.loads(out[1])["explanation"]["target"]["label"] == "espresso"
    assert cache.values("pathway_rejected_requests_total", reason="response_too_large", code="422") == [1, 1]
    envelope = {"instances": [{"image": {"b64": base64.b64encode(coffee).decode()}, "outputs": "overlay"}]}
    ctx = context([{"content-type": "application/json", "explain": "True"}])
    ctx.request_ids = {0: "req-0"}
    out = h.handle([{"body": envelope}], ctx)
    assert ctx.status == {0: 422} and json.loads(out[0])["type"] == "response_too_large"


def test_an_option_given_twice_with_different_values_is_refused_naming_both_places(served, coffee):
    h, context, cache = served
    image = base64.b64encode(coffee).decode()
    json_headers = {"content-type": "application/json", "explain": "True"}
    requests = [
        ({**json_headers, "X-Explain-Top-K": "7"}, {"image": image, "top_k": 2, "method": "gradient"}),
        (json_headers, {"image": image, "top_k": 2, "Top-K": 3, "method": "gradient"}),
        (explain_headers(Target="281"), {"data": bytearray(coffee), "target": bytearray(b"282")}),
        (json_headers, {"image": image, "parameters": {"sparsity": 0.5}, "sparsity": 0.6}),
        # the same value twice is one value; a KServe instance's own field overrides the shared parameters
        ({**json_headers, "X-Explain-Target": "281"}, {"image": image, "target": 281, "method": "gradient"}),
        (json_headers, {"instances": [{"image": image, "target": 285}], "parameters": {"target": 281,
                                                                                      "method": "gradient"}}),
    ]
    ctx = context([headers for headers, _ in requests])
    out = h.handle([{"body": body} if "data" not in body else body for _, body in requests], ctx)
    assert ctx.status == {0: 400, 1: 400, 2: 400, 3: 400}
    errors = [json.loads(out[i]) for i in range(4)]
    assert all(e["type"] == "conflicting_options" for e in errors), errors
    assert "top-k = '7' (headers) and top_k = 2 (the JSON body)" in errors[0]["message"]
    assert "top_k = 2" in errors[1]["message"] and "Top-K = 3" in errors[1]["message"]
    assert "(headers)" in errors[2]["message"] and "(form fields)" in errors[2]["message"]
    assert json.loads(out[4])["explanation"]["target"]["index"] == 281
    assert json.loads(out[5])["explanations"][0]["explanation"]["target"]["index"] == 285


def test_an_error_in_one_image_of_a_kserve_request_names_that_image(served, coffee):
    h, context, cache = served
    image = base64.b64encode(coffee).decode()
    json_headers = {"content-type": "application/json", "explain": "True"}
    bodies = [{"instances": [{"image": image}, {"image": image, "target": 5000}]},
              {"instances": [{"image": image}, {"image": base64.b64encode(b"hello").decode()}]}]
    ctx = context([json_headers, json_headers])
    out = h.handle([{"body": b} for b in bodies], ctx)
    assert ctx.status == {0: 400, 1: 400}
    first, second = (json.loads(o)["message"] for o in out)
    assert first.startswith("image 2 of 2 (instances[1]): target 5000 is out of range"), first
    assert second.startswith("image 2 of 2 (instances[1]): the data is not an image"), second


def test_kserve_v2_tensors_whose_shape_and_data_disagree_are_refused(served, coffee):
    h, context, cache = served
    image = base64.b64encode(coffee).decode()
    json_headers = {"content-type": "application/json", "explain": "True"}
    tensor = {"name": "image", "datatype": "BYTES", "shape": [1], "data": [image]}
    bodies = [{"inputs": [dict(tensor, shape=[3], data=[image, image])]},
              {"inputs": [tensor, {"name": "target", "datatype": "INT64", "shape": [0], "data": []}]},
              {"inputs": [tensor], "id": 42, "parameters": {"method": "gradient"}}]
    ctx = context([json_headers] * 3)
    out = h.handle([{"body": b} for b in bodies], ctx)
    assert ctx.status == {0: 400, 1: 400}
    assert "declares shape [3] (3 values) but holds 2" in json.loads(out[0])["message"]
    assert "input 'target' has no data" in json.loads(out[1])["message"]
    assert json.loads(out[2])["id"] == "42"


def test_a_json_body_that_is_not_an_object_says_so(served):
    h, context, cache = served
    ctx = context([{"content-type": "application/json"}] * 3)
    out = h.handle([{"body": 5}, {"body": None}, {"body": True}], ctx)
    assert ctx.status == {0: 400, 1: 400, 2: 400}
    assert [json.loads(o)["message"].rsplit(" ", 1)[-1] for o in out] == ["5", "null", "True"]


def test_an_explanation_request_is_one_latency_sample_whatever_its_targets_and_one_sparsity_per_target(
        served, coffee):
    h, context, cache = served
    headers = [explain_headers(Targets="espresso,cup", Outputs="pathway"), explain_headers(Outputs="pathway")]
    h.handle([{"body": bytearray(coffee)}] * 2, context(headers))
    assert len(cache.values("pathway_explain_latency_seconds", method="pathway_gradient")) == 2
    assert len(cache.values("pathway_realised_sparsity", method="pathway_gradient")) == 3


def test_an_archive_names_classes_as_the_builtin_model_does(served, coffee):
    """The archive's spec reads the ImageNet names from its own labels.json: "crane" alone (the bird, renamed
    "crane bird" by torchvision, or the machine) stays ambiguous, and a label that differs from another only
    in case names its own class."""
    h, context, cache = served
    targets = ["crane", "maillot", "Cardigan", "cardigan", "CARDIGAN", "crane bird"]
    ctx = context([explain_headers(Method="gradient", Target=t, Outputs="pathway") for t in targets])
    out = h.handle([{"body": bytearray(coffee)}] * len(targets), ctx)
    assert ctx.status == {0: 400, 1: 400, 4: 400}
    assert [json.loads(out[i])["type"] for i in (0, 1, 4)] == ["ambiguous_label"] * 3
    assert "134 'crane bird'" in json.loads(out[0])["message"] and "517 'crane'" in json.loads(out[0])["message"]
    assert [json.loads(out[i])["explanation"]["target"]["index"] for i in (2, 3, 5)] == [264, 474, 134]


def test_a_request_over_the_pass_budget_is_refused_before_any_work_and_its_neighbours_served(served, coffee):
    """8 images x 128 integrated-gradient steps is 1040 passes, over the archive's 1000 per request: without
    the budget a batch of such requests would outlast responseTimeout and TorchServe would kill the worker."""
    h, context, cache = served
    expensive = {"instances": [{"image": {"b64": base64.b64encode(coffee).decode()}}] * 8,
                 "parameters": {"method": "integrated_gradients", "steps": 128}}
    ctx = context([{"content-type": "application/json", "explain": "True"},
                   explain_headers(Method="integrated_gradients", Steps=8)])
    out = h.handle([{"body": expensive}, {"body": bytearray(coffee)}], ctx)
    assert ctx.status == {0: 400}
    error = json.loads(out[0])
    assert error["type"] == "over_limit" and "1040 forward/backward passes" in error["message"], error
    assert json.loads(out[1])["explanation"]["method"] == "integrated_gradients"


def test_explanation_passes_count_what_each_method_and_selection_runs(served):
    h, _, _ = served
    from handler.schema import parse_options

    def passes(**options):
        return h.service.explanation_passes(parse_options(options, h.service.limits))

    assert passes() == 2 and passes(method="gradient") == 2
    assert passes(method="integrated_gradients", steps=20) == 22
    assert passes(method="integrated_gradients") == 2 + 50  # the registered default counts too
    assert passes(method="smoothgrad", samples=10) == 12
    assert passes(selection="pruning_gates", iterations=30) == 2 + 8 * 30  # an iteration costs ~8 passes
    assert passes(selection="resampling_correlation", copies=16) == 18


def test_engine_reported_splits_are_counted_through_the_documented_hook(served, coffee, monkeypatch):
    """The engine's automatic OOM splitting (another branch) reports through Explainer.on_batch_split."""
    h, context, cache = served
    explainer = h.service.explainer
    original = explainer.explain_requests

    def splitting(x, requests):
        report_split(explainer.on_batch_split, BatchSplit(size=x.shape[0], parts=(1, x.shape[0] - 1)))
        return original(x, requests)

    monkeypatch.setattr(explainer, "explain_requests", splitting)
    out = h.handle([{"body": bytearray(coffee)}] * 2, context([explain_headers(Method="gradient")] * 2))
    assert all(json.loads(body)["explanation"]["target"]["label"] == "espresso" for body in out)
    assert cache.values("pathway_oom_splits_total", source="engine") == [1]
    assert cache.values("pathway_oom_splits_total", source="handler") == []


def test_a_failing_split_listener_never_fails_the_explanation(caplog):
    def broken(split):
        raise RuntimeError("metrics backend down")

    with caplog.at_level(logging.ERROR):
        report_split(broken, BatchSplit(size=2, parts=(1, 1)))
    assert "batch-split listener failed" in caplog.text


def test_every_metric_the_handler_emits_is_declared_and_matches_the_worker_cache(served, coffee, caplog):
    h, context, cache = served
    bodies = [{"body": bytearray(coffee)}, {"body": bytearray(b"not an image")}, {"body": bytearray(coffee)}]
    h.handle(bodies, context([explain_headers(Method="gradient", Outputs="heatmap"), {}, {}]))
    names = {name for name, _, _ in cache.records}
    declared = set(load_specs())
    assert names <= declared
    assert {"pathway_requests_total", "pathway_rejected_requests_total", "pathway_explain_latency_seconds",
            "pathway_stage_seconds", "pathway_response_megabytes", "pathway_batch_requests",
            "pathway_engine_batch_images"} <= names
    stages = {(dims["stage"], dims["kind"]) for name, _, dims in cache.records if name == "pathway_stage_seconds"}
    assert {("decode", "predict"), ("engine", "predict"), ("encode", "predict"), ("decode", "explain"),
            ("engine", "explain"), ("render", "explain"), ("encode", "explain")} <= stages
    assert cache.values("pathway_rejected_requests_total", reason="not_an_image", code="400") == [1]
    assert "Failed to update metric" not in caplog.text  # TorchServe's cache accepted every dimension list


def test_undeclared_metric_or_missing_dimension_is_a_bug():
    metrics = HandlerMetrics(None, MODEL)
    with pytest.raises(KeyError):
        metrics._emit("pathway_not_declared", 1)
    with pytest.raises(ValueError):
        metrics._emit("pathway_requests_total", 1, kind="predict")  # no outcome


def test_server_metrics_config_keeps_torchserve_metrics_and_adds_the_archive_ones():
    config = server_metrics_config([yaml.safe_load(SPEC_FILE.read_text())])
    counters = {m["name"] for m in config["ts_metrics"]["counter"]}
    assert {"Requests2XX", "Requests4XX", "Requests5XX", "ts_inference_requests_total"} <= counters
    model = {m["name"] for kind in config["model_metrics"].values() for m in kind}
    assert {"HandlerTime", "PredictionTime"} | set(load_specs()) <= model


# ---------------------------------------------------------------------------
# Envelope rows (what TorchServe's stock KServe envelopes hand the handler)
# ---------------------------------------------------------------------------


def test_rows_are_told_apart_from_torchserve_own_rows():
    assert envelope_of([{"body": bytearray(b"x")}]) is None
    assert envelope_of([{"data": bytearray(b"x"), "target": bytearray(b"3")}]) is None
    assert envelope_of([{"image": {"b64": "AAAA"}, "target": 281}, "AAAA"]) == "kserve"
    v2 = [{"name": "image", "datatype": "BYTES", "shape": [1], "data": "AAAA"}]
    assert envelope_of(v2, type("C", (), {"input_names": ["image"]})()) == "kservev2"


def test_v1_envelope_instances_keep_predictions_next_to_each_explanation(served, coffee):
    h, context, cache = served
    image = base64.b64encode(coffee).decode()
    ctx = context([{"explain": "True"}])
    out = h.handle([{"image": {"b64": image}, "target": 281, "method": "gradient"}, {"b64": image, "method": "gradient"}],
                   ctx)
    assert len(out) == 2 and ctx.status == {}
    assert out[0]["explanation"]["target"]["index"] == 281 and out[0]["predictions"][0]["label"] == "espresso"
    assert out[1]["explanation"]["target"]["label"] == "espresso" and out[1]["predictions"]


def test_v2_envelope_answers_named_predictions_and_explanations(served, coffee):
    h, context, _ = served
    rows = [{"name": "image", "datatype": "BYTES", "shape": [1], "data": base64.b64encode(coffee).decode()},
            {"name": "target", "datatype": "INT64", "shape": [1], "data": [281]},
            {"name": "method", "datatype": "BYTES", "shape": [1], "data": "gradient"}]
    ctx = context([{"explain": "True"}])
    ctx.input_names = ["image", "target", "method"]  # set by the envelope before it calls the handler
    out = h.handle(rows, ctx)
    assert ctx.input_names == ["predictions", "explanations"]
    predictions, document = json.loads(out[0][0]), json.loads(out[1][0])
    assert document["explanation"]["target"]["index"] == 281 and document["predictions"] == predictions


def test_v2_envelope_refuses_several_images_it_would_silently_drop():
    rows = [{"name": "image", "datatype": "BYTES", "shape": [3], "data": "AAAA"}]
    request = parse_envelope("kservev2", rows, {})
    assert request.error is not None and request.error.code == "unsupported_by_envelope"


def test_envelope_with_a_batch_of_several_requests_fails_with_the_reason(served, coffee):
    from ts.utils.util import PredictionException

    h, context, _ = served
    ctx = context([{}, {}])  # two HTTP requests batched, the envelope passes request 0's instances only
    with pytest.raises(PredictionException, match="batchSize: 1"):
        h.handle([{"b64": base64.b64encode(coffee).decode()}], ctx)


def test_envelope_without_instances_is_a_400(served):
    h, context, _ = served
    ctx = context([{"explain": "True"}])
    out = handler_module.PathwayHandler.handle(h, [], ctx)
    assert ctx.status == {0: 400} and out[0]["type"] == "missing_image"


# -- visualisation settings and several targets through every transport (in process) --------------------

OPTION_CASE_TYPES = {"invalid_visualization", "unknown_colormap", "duplicate_target", "unknown_label",
                     "too_many_targets", "conflicting_targets", "invalid_target", "invalid_option"}


def torchserve_row(request: dict) -> tuple:
    """``(row, headers)`` as TorchServe hands the handler what ``requests.post(**request)`` sends."""
    headers = {"explain": "True", **request.get("headers", {})}
    if "json" in request:
        return {"body": request["json"]}, {**headers, "content-type": "application/json"}
    if "files" in request:
        return {name: bytearray(value[1].encode() if isinstance(value[1], str) else value[1])
                for name, value in request["files"].items()}, headers
    return {"body": bytearray(request["data"])}, headers


def test_every_bad_option_of_the_corpus_gets_its_4xx_and_type_in_every_transport(served, coffee):
    """The corpus' cases for the visualisation settings and several targets (JSON, multipart, headers, KServe
    v1 and v2), all in one batch with a good request that is still answered."""
    from bad_inputs import corpus

    h, context, cache = served
    cases = [c for c in corpus(coffee, 1 << 30) if c[3] in OPTION_CASE_TYPES and c[2] == 400
             and ("json" in c[1] or "files" in c[1] or "data" in c[1])]
    transports = {("json" if "json" in c[1] else "files" if "files" in c[1] else "data") for c in cases}
    assert transports == {"json", "files", "data"} and len(cases) >= 15
    rows = [torchserve_row(request) for _, request, _, _ in cases]
    rows.append(({"body": bytearray(coffee)}, {}))
    ctx = context([headers for _, headers in rows])
    out = h.handle([row for row, _ in rows], ctx)
    for i, (name, _, status, error_type) in enumerate(cases):
        body = json.loads(out[i])
        assert (ctx.status.get(i), body["type"]) == (status, error_type), f"{name}: {body}"
    assert json.loads(out[-1])["predictions"][0]["label"] == "espresso"


def test_kserve_carries_targets_per_instance(served, coffee):
    """v1: a list per instance; v2: a [images, K] tensor, row i for image i."""
    h, context, cache = served
    photo = base64.b64encode(coffee).decode()
    v1 = {"instances": [{"image": {"b64": photo}, "targets": [967, "cup"]}, {"image": {"b64": photo}}],
          "parameters": {"method": "gradient"}}
    v2 = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [photo, photo]},
                     {"name": "targets", "datatype": "BYTES", "shape": [2, 2], "data": ["cup", "967", "925", "cup"]}],
          "parameters": {"method": "gradient"}}
    bad_v2 = {"inputs": [v2["inputs"][0], {"name": "targets", "datatype": "INT64", "shape": [3, 1],
                                           "data": [1, 2, 3]}]}
    json_headers = {"content-type": "application/json", "explain": "True"}
    ctx = context([json_headers] * 3)
    out = h.handle([{"body": v1}, {"body": v2}, {"body": bad_v2}], ctx)
    first, second = json.loads(out[0])["explanations"]
    assert [e["target"]["index"] for e in first["explanations"]] == [967, 968]
    assert second["explanation"]["target"]["index"] == 967  # the other instance: the predicted class
    outputs = {o["name"]: o["data"] for o in json.loads(out[1])["outputs"]}
    documents = [json.loads(d) for d in outputs["explanations"]]
    assert [[e["target"]["index"] for e in d["explanations"]] for d in documents] == [[968, 967], [925, 968]]
    assert ctx.status == {2: 400} and "one row per image" in json.loads(out[2])["message"]


def test_png_with_several_targets_answers_a_strip_with_list_headers(served, coffee):
    from PIL import Image
    import io

    h, context, cache = served
    ctx = context([{"explain": "True", "accept": "image/png", "X-Explain-Targets": "cup,espresso",
                    "X-Explain-Method": "gradient"}])
    [png] = h.handle([{"body": bytearray(coffee)}], ctx)
    assert ctx.content_type[0] == "image/png"
    assert ctx.response_headers[0]["X-Explain-Target-Index"] == "968,967"
    assert ctx.response_headers[0]["X-Explain-Target-Label"] == "cup,espresso"
    strip = Image.open(io.BytesIO(png))
    assert strip.width > 2 * strip.height
