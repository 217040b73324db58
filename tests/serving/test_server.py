"""Predictions and explanations over HTTP through a real TorchServe: every input form, per-request options,
mixed batches, KServe bodies, authorisation and per-request errors."""

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests
from PIL import Image

from handler.cli import run as cli_run

pytestmark = pytest.mark.server
MODEL = "efficientnet_lite0"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def attribution_of(document: dict) -> np.ndarray:
    return np.load(io.BytesIO(base64.b64decode(document["explanation"]["attribution"]["data"])))


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory, photos):
    """The CLI's documents and attributions for the same photos and options."""
    out = tmp_path_factory.mktemp("cli")
    assert cli_run(["--out", str(out), "--save-attribution", "--sparsity", "0.7", "--target", "282",
                    str(photos["chelsea"])]) == 0
    assert cli_run(["--out", str(out / "auto"), "--save-attribution", str(photos["coffee"])]) == 0
    return {
        "chelsea": (json.loads((out / "chelsea.json").read_text()), np.load(out / "chelsea.attribution.npy")),
        "coffee": (json.loads((out / "auto" / "coffee.json").read_text()),
                   np.load(out / "auto" / "coffee.attribution.npy")),
    }


def test_raw_body_predictions_equal_the_cli_top5(server, coffee, cli_reference):
    reply = requests.put(f"{server.url}/predictions/{MODEL}", data=coffee, headers=server.headers(), timeout=300)
    assert reply.status_code == 200, reply.text
    doc = reply.json()
    assert doc["model"] == MODEL
    cli_doc = cli_reference["coffee"][0]
    assert [p["index"] for p in doc["predictions"]] == [p["index"] for p in cli_doc["predictions"]]
    for a, b in zip(doc["predictions"], cli_doc["predictions"]):
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)


def test_raw_body_explanation_comes_with_predictions_and_equals_the_cli(server, coffee, cli_reference):
    reply = server.post(f"/explanations/{MODEL}", data=coffee,
                        headers={"Content-Type": "application/octet-stream", "X-Explain-Outputs": "heatmap,attribution,pathway"})
    assert reply.status_code == 200, reply.text
    doc = reply.json()
    cli_doc, cli_map = cli_reference["coffee"]
    assert doc["predictions"] == cli_doc["predictions"]
    assert doc["explanation"]["target"] == cli_doc["explanation"]["target"]
    assert doc["explanation"]["pathway"]["realised_sparsity"] == cli_doc["explanation"]["pathway"]["realised_sparsity"]
    served = attribution_of(doc)
    assert served.dtype == np.float16 and served.shape == (224, 224)
    assert np.abs(served.astype(np.float32) - cli_map).max() < 2e-3
    heatmap = Image.open(io.BytesIO(base64.b64decode(doc["explanation"]["heatmap"]["data"])))
    assert heatmap.size == (224, 224)


def test_default_explanation_response_is_small(server, coffee):
    reply = server.post(f"/explanations/{MODEL}", data=coffee, headers={"Content-Type": "image/png"})
    assert reply.status_code == 200
    assert len(reply.content) <= 150_000
    assert set(reply.json()["explanation"]) >= {"heatmap", "pathway", "target"}


def test_multipart_with_target_field(server, chelsea, cli_reference):
    reply = server.post(f"/explanations/{MODEL}", files={"data": ("chelsea.png", chelsea, "image/png")},
                        data={"target": "282", "sparsity": "0.7", "outputs": "attribution,pathway"})
    assert reply.status_code == 200, reply.text
    doc = reply.json()
    cli_doc, cli_map = cli_reference["chelsea"]
    assert doc["explanation"]["target"]["index"] == 282
    assert doc["explanation"]["target"] == cli_doc["explanation"]["target"]
    assert np.abs(attribution_of(doc).astype(np.float32) - cli_map).max() < 2e-3
    assert "heatmap" not in doc["explanation"]


def test_json_body_with_label_target_and_options(server, chelsea):
    reply = server.post(f"/explanations/{MODEL}", json={"image": b64(chelsea), "target": "tiger cat", "top_k": 3,
                                                         "sparsity": 0.9, "outputs": ["overlay"], "colormap": "viridis"})
    assert reply.status_code == 200, reply.text
    doc = reply.json()
    assert doc["explanation"]["target"]["index"] == 282
    assert len(doc["predictions"]) == 3
    assert "pathway" not in doc["explanation"]
    overlay = Image.open(io.BytesIO(base64.b64decode(doc["explanation"]["overlay"]["data"])))
    assert overlay.size == Image.open(io.BytesIO(chelsea)).size


def test_accept_png_returns_the_overlay_itself(server, coffee):
    reply = server.post(f"/explanations/{MODEL}", data=coffee,
                        headers={"Content-Type": "application/octet-stream", "Accept": "image/png"})
    assert reply.status_code == 200
    assert reply.headers["content-type"] == "image/png"
    assert reply.headers["X-Explain-Target-Label"] == "espresso"
    assert Image.open(io.BytesIO(reply.content)).size == Image.open(io.BytesIO(coffee)).size


def test_kserve_v1_explain_keeps_predictions_next_to_explanations(server, coffee, chelsea):
    body = {"instances": [{"image": {"b64": b64(coffee)}}, {"image": {"b64": b64(chelsea)}, "target": 281}],
            "parameters": {"outputs": ["pathway"]}}
    reply = server.post(f"/v1/models/{MODEL}:explain", json=body)
    assert reply.status_code == 200, reply.text
    doc = reply.json()
    assert len(doc["predictions"]) == 2 and len(doc["explanations"]) == 2
    assert doc["predictions"][0][0]["label"] == "espresso"
    assert doc["explanations"][0]["explanation"]["target"]["label"] == "espresso"
    assert doc["explanations"][1]["explanation"]["target"]["index"] == 281
    assert doc["explanations"][1]["predictions"] == doc["predictions"][1]
    predict = server.post(f"/v1/models/{MODEL}:predict", json={"instances": [{"image": {"b64": b64(coffee)}}]})
    assert predict.status_code == 200 and set(predict.json()) == {"predictions"}


def test_kserve_v2_explain_with_bytes_input(server, coffee):
    body = {"id": "req-1", "inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64(coffee)]}],
            "parameters": {"sparsity": 0.8}}
    reply = server.post(f"/v2/models/{MODEL}/explain", json=body)
    assert reply.status_code == 200, reply.text
    doc = reply.json()
    assert doc["id"] == "req-1" and doc["model_name"] == MODEL
    outputs = {o["name"]: o for o in doc["outputs"]}
    predictions = json.loads(outputs["predictions"]["data"][0])
    explanation = json.loads(outputs["explanations"]["data"][0])
    assert predictions[0]["label"] == "espresso"
    assert explanation["explanation"]["pathway"]["requested_sparsity"] == 0.8
    assert explanation["predictions"] == predictions


def test_concurrent_mixed_batch_answers_each_request_as_if_alone(server, coffee, chelsea):
    cases = [
        ("predictions", coffee, {}),
        ("explanations", chelsea, {"target": 282}),
        ("explanations", coffee, {"target": 968, "sparsity": 0.5}),
        ("predictions", chelsea, {"top_k": 2}),
        ("explanations", chelsea, {"target": 285, "method": "gradient"}),
        ("explanations", coffee, {}),
    ]

    def call(case):
        route, image, options = case
        body = {"image": b64(image), **options}
        if route == "explanations":
            body["outputs"] = ["attribution"]
        return server.post(f"/{route}/{MODEL}", json=body)

    sequential = [call(c) for c in cases]
    before = server.logged_batches()
    with ThreadPoolExecutor(len(cases)) as pool:
        concurrent = list(pool.map(call, cases))
    for (route, _, options), alone, together in zip(cases, sequential, concurrent):
        assert alone.status_code == together.status_code == 200, together.text
        a, b = alone.json(), together.json()
        assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]]
        if route == "explanations":
            ta, tb = a["explanation"]["target"], b["explanation"]["target"]
            assert ta["index"] == tb["index"]
            assert ta["probability"] == pytest.approx(tb["probability"], abs=1e-4)
            assert ta.get("pathway_probability", 0) == pytest.approx(tb.get("pathway_probability", 0), abs=1e-3)
            if "target" in options:
                assert b["explanation"]["target"]["index"] == options["target"]
            ma, mb = attribution_of(a).astype(np.float32), attribution_of(b).astype(np.float32)
            # float32 kernels differ slightly between batch sizes, which can move a few neurons across the
            # pathway threshold: the maps agree to within that noise, and a mixed-up sample would not
            assert np.corrcoef(ma.ravel(), mb.ravel())[0, 1] > 0.999
        else:
            assert "explanation" not in b and len(b["predictions"]) == options.get("top_k", 5)
    sizes = server.batch_sizes(skip=before, requests=len(cases))  # waits for the log to catch up
    assert len(sizes) < len(cases), "concurrent requests were never batched together"
    assert max(sizes) > 1


def test_missing_token_is_refused(server, coffee):
    reply = requests.post(f"{server.url}/predictions/{MODEL}", data=coffee, timeout=60,
                          headers={"Content-Type": "application/octet-stream"})
    # TorchServe 0.12 answers a missing or wrong token with 400 InvalidKeyException (not 401).
    assert reply.status_code in (400, 401)
    assert "Token Authorization failed" in reply.text
    wrong = requests.post(f"{server.url}/explanations/{MODEL}", data=coffee, timeout=60,
                          headers={"Content-Type": "application/octet-stream", "Authorization": "Bearer nope"})
    assert wrong.status_code in (400, 401)


BAD_REQUESTS = [
    ("not an image", dict(data=b"hello, I am text", headers={"Content-Type": "application/octet-stream"}), 400,
     "not_an_image"),
    ("empty body", dict(data=b"", headers={"Content-Type": "application/octet-stream"}), 400, None),
    ("unsupported format", "ico", 415, "unsupported_image_format"),
    ("too many pixels", "bomb", 413, "image_too_large"),
    ("bad base64", dict(json={"image": "***not base64***"}), 400, "bad_base64"),
    ("no image in JSON", dict(json={"target": 3}), 400, "missing_image"),
    ("malformed JSON", dict(data=b'{"image": ', headers={"Content-Type": "application/json"}), 400, "malformed_json"),
    ("text body", dict(data="plain words", headers={"Content-Type": "text/plain"}), 415, None),
    ("unknown method", dict(json={"image": "PHOTO", "method": "magic"}), 400, "unknown_method"),
    ("target out of range", dict(json={"image": "PHOTO", "target": 1000}), 400, "target_out_of_range"),
    ("unknown label", dict(json={"image": "PHOTO", "target": "unicorn"}), 400, "unknown_label"),
    ("sparsity outside [0, 1)", dict(json={"image": "PHOTO", "sparsity": 1.5}), 400, "invalid_sparsity"),
    ("top_k above the archive's cap of 20", dict(json={"image": "PHOTO", "top_k": 21}), 400, "invalid_top_k"),
    ("unknown output", dict(json={"image": "PHOTO", "outputs": ["video"]}), 400, "unknown_output"),
    ("unknown option", dict(json={"image": "PHOTO", "sparcity": 0.5}), 400, "unknown_option"),
    ("unknown Grad-CAM layer", dict(json={"image": "PHOTO", "method": "grad_cam", "layer": "no.such.layer"}), 400,
     "invalid_layer"),
    ("steps above the archive's cap", dict(json={"image": "PHOTO", "method": "integrated_gradients", "steps": 200}),
     400, "over_limit"),
    ("multipart without image", dict(files={"target": (None, "3")}), 400, "missing_image"),
    ("too many KServe instances", "many", 413, "too_many_instances"),
]


def _materialise(spec, photo: bytes):
    if spec == "ico":
        buf = io.BytesIO()
        Image.new("RGB", (32, 32)).save(buf, format="ICO")
        return dict(data=buf.getvalue(), headers={"Content-Type": "application/octet-stream"})
    if spec == "bomb":
        import zlib

        header = io.BytesIO()
        Image.new("L", (10, 10)).save(header, format="PNG")
        h = header.getvalue()
        ihdr = b"IHDR" + (60000).to_bytes(4, "big") + (60000).to_bytes(4, "big") + h[24:29]
        return dict(data=h[:12] + ihdr + zlib.crc32(ihdr).to_bytes(4, "big") + h[33:],
                    headers={"Content-Type": "application/octet-stream"})
    if spec == "many":
        return dict(json={"instances": [{"image": {"b64": b64(photo)}}] * 17})
    spec = dict(spec)
    if "json" in spec:
        spec["json"] = {k: (b64(photo) if v == "PHOTO" else v) for k, v in spec["json"].items()}
    return spec


@pytest.mark.parametrize("name, spec, status, type_", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_each_bad_request_gets_its_own_4xx_and_the_worker_stays_up(server, coffee, name, spec, status, type_):
    reply = server.post(f"/explanations/{MODEL}", **_materialise(spec, coffee))
    assert reply.status_code == status, reply.text
    body = reply.json()
    assert body["code"] == status and body["message"]
    if type_:
        assert body["type"] == type_
    if type_ == "invalid_top_k":  # the cap comes from the archive's model-config.yaml, not the code default
        assert "between 1 and 20" in body["message"]
    after = server.post(f"/predictions/{MODEL}", data=coffee, headers={"Content-Type": "application/octet-stream"})
    assert after.status_code == 200 and after.json()["predictions"][0]["label"] == "espresso"


def test_a_bad_request_in_a_concurrent_batch_fails_alone(server, coffee, chelsea):
    good = {"image": b64(chelsea), "target": 282}
    bad = {"image": b64(coffee), "target": 99999}
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda body: server.post(f"/explanations/{MODEL}", json=body), [good, bad, good, bad]))
    assert [r.status_code for r in replies] == [200, 400, 200, 400]
    assert all(r.json()["explanation"]["target"]["index"] == 282 for r in replies[::2])
