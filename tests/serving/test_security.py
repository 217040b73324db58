"""Security defaults, checked on the running server where they are behaviour and on the files where they
are configuration: tokens on inference and management, no model registration, loopback binding, limited
allowed_urls, weights loaded with weights_only=True, image/request size limits and explanation cost caps."""

from __future__ import annotations

import os
import re
from pathlib import Path

import psutil
import pytest
import requests
import torch

from handler.engine import METHODS, register_method
from handler.engine.options import OptionSpec
from handler.errors import ExplainError
from handler.models import ModelLoadError, read_state_dict
from handler.schema import Limits, parse_options

ROOT = Path(__file__).resolve().parents[2]
MODEL = "efficientnet_lite0"
RAW = {"Content-Type": "application/octet-stream"}


def config() -> dict:
    return dict(line.split("=", 1) for line in (ROOT / "config.properties").read_text().splitlines()
                if line.strip() and not line.startswith("#"))


# ---------------------------------------------------------------------------
# Tokens and the management API (live)
# ---------------------------------------------------------------------------


@pytest.mark.server
@pytest.mark.parametrize("path", ["/ping", f"/predictions/{MODEL}", f"/explanations/{MODEL}",
                                  f"/v1/models/{MODEL}:explain", f"/v2/models/{MODEL}/infer"])
def test_inference_routes_refuse_a_missing_or_wrong_token(server, photos, path):
    data = photos["coffee"].read_bytes()
    for headers in (RAW, {**RAW, "Authorization": "Bearer not-the-key"},
                    {**RAW, "Authorization": f"Bearer {server.management_token}"}):  # wrong kind of key
        method = requests.get if path == "/ping" else requests.post
        reply = method(f"{server.url}{path}", data=None if path == "/ping" else data, headers=headers, timeout=60)
        assert reply.status_code in (400, 401), (path, headers, reply.status_code)
        assert "Token Authorization failed" in reply.text


@pytest.mark.server
def test_management_api_refuses_a_missing_or_inference_token(server):
    for token in (None, server.token):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        reply = requests.get(f"{server.management_url}/models", headers=headers, timeout=60)
        assert reply.status_code in (400, 401) and "Token Authorization failed" in reply.text
    assert server.management("GET", "/models").status_code == 200


@pytest.mark.server
def test_model_registration_is_refused_even_with_the_management_token(server, tmp_path):
    for url in ("https://example.invalid/evil.mar", f"file://{tmp_path}/model_store/evil.mar", "evil.mar"):
        reply = server.management("POST", "/models", params={"url": url, "initial_workers": "1"})
        # TorchServe 0.12 with enable_model_api=false: 405 MethodNotAllowedException, nothing fetched
        assert reply.status_code == 405, (url, reply.status_code, reply.text)
        assert reply.json()["type"] == "MethodNotAllowedException"
    listed = server.management("GET", "/models").json()["models"]
    assert [m["modelName"] for m in listed] == [MODEL]


@pytest.mark.server
def test_model_cannot_be_unregistered_or_rescaled_without_the_management_token(server):
    assert requests.delete(f"{server.management_url}/models/{MODEL}", timeout=60).status_code in (400, 401)
    assert requests.put(f"{server.management_url}/models/{MODEL}?min_worker=8", timeout=60).status_code in (400, 401)


# ---------------------------------------------------------------------------
# Binding and configuration
# ---------------------------------------------------------------------------


def test_config_binds_loopback_keeps_tokens_and_limits_allowed_urls():
    props = config()
    for key in ("inference_address", "management_address", "metrics_address"):
        assert props[key].startswith("http://127.0.0.1:"), key
    assert props.get("disable_token_authorization", "false") == "false"
    assert props["enable_model_api"] == "false"
    pattern = re.compile(props["allowed_urls"].replace("\\\\", "\\"))
    assert pattern.match("file:///srv/pathway/model_store/efficientnet_lite0.mar")
    for url in ("http://169.254.169.254/latest/meta-data", "https://example.com/model_store/x.mar",
                "file:///etc/passwd", "file:///srv/model_store/../../etc/x.mar", "file:///srv/model_store/a.mar.sh",
                "file:///srv/elsewhere/x.mar"):
        assert not pattern.match(url), url
    assert int(props["max_request_size"]) <= 32 * 2 ** 20 and props["limit_max_image_pixels"] == "true"


@pytest.mark.server
def test_running_server_listens_on_loopback_only(server):
    frontend = psutil.Process(server.proc.pid)
    listening = []
    for process in [frontend, *frontend.children(recursive=True)]:
        try:
            listening += [c.laddr for c in process.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            continue
    assert listening, "found no listening sockets of the server"
    assert {addr.ip for addr in listening} <= {"127.0.0.1", "::1", "::ffff:127.0.0.1"}, listening
    ports = {addr.port for addr in listening}
    assert {server.ports["inference"], server.ports["management"], server.ports["metrics"]} <= ports


# ---------------------------------------------------------------------------
# Weights: weights_only=True refuses pickled code
# ---------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_bomb_state_dict_is_refused_with_a_clear_error_and_runs_nothing(tmp_path):
    marker = tmp_path / "code-ran"
    weights = tmp_path / "weights.pth"
    torch.save({"conv.weight": torch.zeros(1), "evil": _Payload(marker)}, weights, pickle_protocol=2)
    with pytest.raises(ModelLoadError, match="weights_only=True") as refused:
        read_state_dict(weights)
    assert "weights.pth" in str(refused.value)
    assert not marker.exists()


def test_archive_builder_refuses_a_pickle_bomb_before_packing_it(tmp_path):
    import subprocess
    import sys

    marker = tmp_path / "code-ran"
    weights = tmp_path / "evil.pth"
    torch.save({"fc.weight": _Payload(marker)}, weights)
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(f"c{i}" for i in range(10)))
    proc = subprocess.run([sys.executable, "-m", "handler.serving.archive", "--arch", "resnet18", "--weights",
                           str(weights), "--labels", str(labels), "--out", str(tmp_path / "store")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 2 and "weights_only=True" in proc.stderr
    assert not marker.exists() and not list((tmp_path / "store").glob("*.mar"))


# ---------------------------------------------------------------------------
# Size limits and explanation cost caps
# ---------------------------------------------------------------------------


@pytest.mark.server
def test_image_pixel_limit_comes_from_the_archive_and_is_enforced(server):
    from bad_inputs import png_declaring

    reply = server.post(f"/predictions/{MODEL}", data=png_declaring(8000, 6000), headers=RAW)  # 48 MP > 40 MP
    assert reply.status_code == 413 and reply.json()["type"] == "image_too_large"


@pytest.fixture
def method_with_cost_options():
    """A registered method that declares the cost options the caps are for (steps, samples, iterations)."""
    name = "test_costly_method"
    spec = {"steps": OptionSpec(int, 32, minimum=1), "samples": OptionSpec(int, 16, minimum=1),
            "iterations": OptionSpec(int, 100, minimum=1)}
    register_method(name, options=spec)(lambda model, x, targets, **options: None)
    yield name
    METHODS._entries.pop(name)


@pytest.mark.parametrize("option, cap", [("steps", 128), ("samples", 64), ("iterations", 120)])
def test_method_cost_options_above_the_archive_caps_are_refused(lite0_service, method_with_cost_options, option, cap):
    from dataclasses import replace

    from handler.serving.archive import DEFAULT_PATHWAY_CONFIG

    limits = Limits.from_config(DEFAULT_PATHWAY_CONFIG["limits"])
    assert limits.method_caps[option] == cap
    service = lite0_service
    saved = service.limits
    service.limits = replace(saved, method_caps=limits.method_caps)
    try:
        image = service.decode(_tiny_png())
        at_cap = parse_options({"method": method_with_cost_options, option: cap}, service.limits)
        over = parse_options({"method": method_with_cost_options, option: cap + 1}, service.limits)
        [refused] = service.explain([image], [over])
        assert isinstance(refused, ExplainError) and refused.code == "over_limit" and str(cap) in refused.message
        service._check_caps(service.explainer.validate(_request(at_cap)))  # at the cap: accepted
    finally:
        service.limits = saved


def _request(options):
    from handler.service import request_of

    return request_of(options)


def _tiny_png() -> bytes:
    from bad_inputs import encode, gradient_image

    return encode(gradient_image((32, 32)), "PNG")


def test_request_count_limits_are_configured():
    from handler.serving.archive import DEFAULT_PATHWAY_CONFIG

    assert DEFAULT_PATHWAY_CONFIG["max_instances_per_request"] <= 16
    assert DEFAULT_PATHWAY_CONFIG["limits"]["max_image_pixels"] <= 40_000_000
    assert DEFAULT_PATHWAY_CONFIG["limits"]["max_top_k"] <= 20


def test_server_environment_retains_the_heap_only_when_asked(tmp_path):
    from handler.serving.launcher import RETAINED_HEAP, server_environment

    default = server_environment({"PATH": "/bin"}, tmp_path)
    assert not set(RETAINED_HEAP) & set(default) and default["TMPDIR"] == str(tmp_path / "tmp")
    env = server_environment({"PATHWAY_RETAIN_HEAP": "1"}, tmp_path)
    assert {k: env[k] for k in RETAINED_HEAP} == RETAINED_HEAP
    own = server_environment({"PATHWAY_RETAIN_HEAP": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}, tmp_path)
    assert own["MALLOC_MMAP_THRESHOLD_"] == "65536"  # an operator's own setting wins


def test_workers_start_with_one_openblas_thread_unless_the_operator_says_otherwise(tmp_path):
    """NumPy's OpenBLAS threads keep spinning after a product and take the cores from the worker's torch threads."""
    from handler.serving.launcher import server_environment

    assert server_environment({"PATH": "/bin"}, tmp_path)["OPENBLAS_NUM_THREADS"] == "1"
    assert server_environment({"OPENBLAS_NUM_THREADS": "4"}, tmp_path)["OPENBLAS_NUM_THREADS"] == "4"
