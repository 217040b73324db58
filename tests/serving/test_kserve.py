"""KServe: the manifests and the staged storage parsed and checked, and TorchServe run here with the stock
KServe envelopes (``service_envelope=kserve`` / ``kservev2``, as KServe's TorchServe runtime configures it):
each explanation that comes back through an envelope still carries its predictions."""

from __future__ import annotations

import base64
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KSERVE = ROOT / "deploy" / "kserve"
MODEL = "efficientnet_lite0"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def properties(text: str) -> dict:
    return dict(line.split("=", 1) for line in text.splitlines() if line.strip() and not line.startswith("#"))


def attribution(document: dict) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(document["explanation"]["attribution"]["data"]))).astype(np.float32)


# ---------------------------------------------------------------------------
# Manifests and storage layout
# ---------------------------------------------------------------------------


def test_inference_service_asks_for_gpus_and_bounded_replicas():
    service = yaml.safe_load((KSERVE / "inferenceservice.yaml").read_text())
    assert service["apiVersion"] == "serving.kserve.io/v1beta1" and service["kind"] == "InferenceService"
    predictor = service["spec"]["predictor"]
    assert 1 <= predictor["minReplicas"] <= predictor["maxReplicas"]
    model = predictor["model"]
    assert model["modelFormat"]["name"] == "pytorch" and model["protocolVersion"] in ("v1", "v2")
    assert model["storageUri"]
    for section in ("requests", "limits"):
        assert int(model["resources"][section]["nvidia.com/gpu"]) >= 1
    annotations = service["metadata"]["annotations"]
    assert annotations["prometheus.kserve.io/port"] == "8082"


def test_kserve_config_uses_the_envelope_with_batch_size_one_and_keeps_torchserve_on_loopback():
    props = properties((KSERVE / "config.properties").read_text())
    assert props["service_envelope"] == "kserve"
    snapshot = json.loads(props["model_snapshot"])
    version = snapshot["models"][MODEL]["1.0"]
    assert version["batchSize"] == 1 and version["marName"] == f"{MODEL}.mar"
    # Token authorisation is off only because the stock wrapper cannot send a token: then nothing but
    # the wrapper in the same container may reach TorchServe.
    if props.get("disable_token_authorization") == "true":
        assert props["inference_address"].startswith("http://127.0.0.1:")
        assert props["management_address"].startswith("http://127.0.0.1:")
    assert props["enable_model_api"] == "false"
    assert props["allowed_urls"].startswith("^file:///mnt/models/model-store/")
    assert props["metrics_mode"] == "prometheus" and props["metrics_config"] == "/mnt/models/config/metrics.yaml"
    assert props["metrics_address"].endswith(":8082")


@pytest.mark.parametrize("protocol, envelope", [("v1", "kserve"), ("v2", "kservev2")])
def test_staged_storage_has_the_layout_the_runtime_reads(tmp_path, server_archive, protocol, envelope):
    out = tmp_path / "storage"
    proc = subprocess.run([sys.executable, str(KSERVE / "stage_storage.py"), str(out), "--protocol", protocol,
                           "--mar", str(server_archive)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    props = properties((out / "config" / "config.properties").read_text())
    assert props["service_envelope"] == envelope
    assert (out / "model-store" / f"{MODEL}.mar").is_file()
    metrics = yaml.safe_load((out / "config" / "metrics.yaml").read_text())
    declared = {m["name"] for kind in metrics["model_metrics"].values() for m in kind}
    assert {"pathway_explain_latency_seconds", "pathway_oom_splits_total", "PredictionTime"} <= declared
    assert "Requests5XX" in {m["name"] for m in metrics["ts_metrics"]["counter"]}


@pytest.fixture(scope="module")
def server_archive(tmp_path_factory):
    from server_harness import build_test_archive

    return build_test_archive(tmp_path_factory.mktemp("kserve_store"), batch_size=1, max_batch_delay=5)


# ---------------------------------------------------------------------------
# Through TorchServe's stock envelopes
# ---------------------------------------------------------------------------


def start_with_envelope(envelope, server_archive, tmp_path_factory):
    from server_harness import Server

    return Server(tmp_path_factory.mktemp(f"run_{envelope}"), server_archive.parent,
                  env={"TS_SERVICE_ENVELOPE": envelope}).start()


@pytest.fixture(scope="module")
def v1_server(server_archive, tmp_path_factory):
    srv = start_with_envelope("kserve", server_archive, tmp_path_factory)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def v2_server(server_archive, tmp_path_factory):
    srv = start_with_envelope("kservev2", server_archive, tmp_path_factory)
    yield srv
    srv.stop()


pytestmark = pytest.mark.server


def v1(server, route: str, instances: list):
    return server.post(route, json={"instances": instances})


def test_v1_explain_keeps_predictions_next_to_each_explanation(v1_server, server, coffee, chelsea):
    instances = [{"image": {"b64": b64(coffee)}, "outputs": ["attribution", "pathway"]},
                 {"image": {"b64": b64(chelsea)}, "target": 282, "outputs": ["attribution", "pathway"]}]
    reply = v1(v1_server, f"/v1/models/{MODEL}:explain", instances)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert set(body) == {"explanations"}  # the envelope's wrapper; each document carries its predictions
    first, second = body["explanations"]
    assert first["predictions"][0]["label"] == "espresso" and first["explanation"]["target"]["label"] == "espresso"
    assert second["explanation"]["target"]["index"] == 282 and second["predictions"][0]["index"] in (281, 282, 285)
    # the same answer as without an envelope (the session's server, plain JSON body)
    plain = server.post(f"/explanations/{MODEL}", json={"image": b64(chelsea), "target": 282,
                                                         "outputs": ["attribution", "pathway"]}).json()
    assert [p["index"] for p in second["predictions"]] == [p["index"] for p in plain["predictions"]]
    for ours, theirs in zip(second["predictions"], plain["predictions"]):
        assert ours["probability"] == pytest.approx(theirs["probability"], abs=1e-5)
    assert second["explanation"]["target"]["index"] == plain["explanation"]["target"]["index"]
    assert second["explanation"]["target"]["pathway_probability"] == pytest.approx(
        plain["explanation"]["target"]["pathway_probability"], abs=1e-3)
    assert np.corrcoef(attribution(second).ravel(), attribution(plain).ravel())[0, 1] > 0.999


def test_v1_predict_and_the_routes_the_kserve_wrapper_calls(v1_server, coffee):
    predict = v1(v1_server, f"/v1/models/{MODEL}:predict", [{"image": {"b64": b64(coffee)}}, b64(coffee)])
    assert predict.status_code == 200, predict.text
    assert [p[0]["label"] for p in predict.json()["predictions"]] == ["espresso", "espresso"]
    # KServe's TorchServe wrapper forwards :predict / :explain to /predictions/{m} and /explanations/{m}.
    explain = v1(v1_server, f"/explanations/{MODEL}", [{"image": {"b64": b64(coffee)}, "method": "gradient"}])
    assert explain.status_code == 200, explain.text
    [document] = explain.json()["explanations"]
    assert document["predictions"][0]["label"] == "espresso" and "heatmap" in document["explanation"]


def test_v1_envelope_bad_instance_is_a_4xx_with_the_error_document(v1_server, coffee):
    reply = v1(v1_server, f"/v1/models/{MODEL}:explain", [{"image": {"b64": b64(coffee)}, "target": 5000}])
    assert reply.status_code == 400
    assert reply.json()["explanations"][0]["type"] == "target_out_of_range"
    empty = v1(v1_server, f"/v1/models/{MODEL}:explain", [])
    assert empty.status_code == 400 and empty.json()["explanations"][0]["type"] == "missing_image"


def v2_body(image: bytes, **extra) -> dict:
    inputs = [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64(image)]}]
    for name, value in extra.items():
        if isinstance(value, str):
            inputs.append({"name": name, "datatype": "BYTES", "shape": [1], "data": [value]})
        else:
            inputs.append({"name": name, "datatype": "INT64", "shape": [1], "data": [value]})
    return {"id": "req-42", "inputs": inputs}


def outputs_of(reply) -> dict:
    return {o["name"]: o for o in reply.json()["outputs"]}


def test_v2_explain_returns_predictions_and_explanations_outputs(v2_server, chelsea):
    reply = v2_server.post(f"/v2/models/{MODEL}/explain", json=v2_body(chelsea, target=282, method="gradient"))
    assert reply.status_code == 200, reply.text
    assert reply.json()["id"] == "req-42" and reply.json()["model_name"] == MODEL
    outputs = outputs_of(reply)
    assert set(outputs) == {"predictions", "explanations"}
    assert outputs["explanations"]["datatype"] == "BYTES" and outputs["explanations"]["shape"] == [1]
    predictions = json.loads(outputs["predictions"]["data"][0])
    document = json.loads(outputs["explanations"]["data"][0])
    assert document["explanation"]["target"]["index"] == 282
    assert document["predictions"] == predictions and predictions[0]["index"] in (281, 282, 285)


def test_v2_infer_and_the_route_the_kserve_wrapper_calls(v2_server, coffee):
    for route in (f"/v2/models/{MODEL}/infer", f"/predictions/{MODEL}"):
        reply = v2_server.post(route, json=v2_body(coffee))
        assert reply.status_code == 200, reply.text
        outputs = outputs_of(reply)
        assert set(outputs) == {"predictions"}
        assert json.loads(outputs["predictions"]["data"][0])[0]["label"] == "espresso"


def test_v2_envelope_refuses_the_images_it_would_drop(v2_server, coffee):
    body = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [b64(coffee), b64(coffee)]}]}
    reply = v2_server.post(f"/v2/models/{MODEL}/explain", json=body)
    assert reply.status_code == 400
    error = json.loads(outputs_of(reply)["error"]["data"][0])
    assert error["type"] == "unsupported_by_envelope"
