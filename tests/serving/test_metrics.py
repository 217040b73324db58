"""Prometheus metrics scraped from a real TorchServe's metrics address after traffic: the handler's
pathway_* metrics are exposed (TorchServe only exposes what the server's metrics_config declares, which
pathway-serve builds from the archive's metrics.yaml) with plausible values."""

from __future__ import annotations

import base64
import re
import time
import zipfile
from pathlib import Path

import pytest
import yaml

from handler.serving.metrics import load_specs

pytestmark = pytest.mark.server
ROOT = Path(__file__).resolve().parents[2]
MODEL = "efficientnet_lite0"
RAW = {"Content-Type": "application/octet-stream"}
SAMPLE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>.*)\})?\s+(?P<value>\S+)$')


def parse(exposition: str) -> list:
    """(name, labels, value) for every sample line of a Prometheus text exposition."""
    samples = []
    for line in exposition.splitlines():
        match = SAMPLE.match(line.strip())
        if match and not line.startswith("#"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
            samples.append((match["name"], labels, float(match["value"])))
    return samples


def value(samples, name, **labels) -> float:
    return sum(v for n, ls, v in samples if n == name and all(ls.get(k) == w for k, w in labels.items()))


@pytest.fixture(scope="module")
def scraped(server, photos):
    """Traffic of every kind, then the scrape (polled until the frontend has applied the worker's lines)."""
    coffee, chelsea = photos["coffee"].read_bytes(), photos["chelsea"].read_bytes()
    before = parse(server.metrics())
    sent = {"predict": 0, "explain": 0, "rejected": 0}
    for _ in range(3):
        assert server.post(f"/predictions/{MODEL}", data=coffee, headers=RAW).status_code == 200
        sent["predict"] += 1
    for body in ({"image": base64.b64encode(chelsea).decode(), "target": 282, "sparsity": 0.8},
                 {"image": base64.b64encode(coffee).decode(), "method": "gradient"}):
        assert server.post(f"/explanations/{MODEL}", json=body).status_code == 200
        sent["explain"] += 1
    for bad in ({"json": {"image": base64.b64encode(coffee).decode(), "target": 5000}},
                {"data": b"not an image", "headers": RAW}):
        assert server.post(f"/explanations/{MODEL}", **bad).status_code == 400
        sent["rejected"] += 1
    deadline = time.monotonic() + 60
    while True:
        after = parse(server.metrics())
        grew = value(after, "pathway_requests_total") - value(before, "pathway_requests_total")
        if grew >= sum(sent.values()) or time.monotonic() > deadline:
            return before, after, sent
        time.sleep(1)


def test_server_runs_this_checkout_and_registers_the_archive_metrics(server):
    """pathway-serve came from this checkout (it wrote the merged metrics configuration) and the worker runs
    the archive's copy of the handler (which carries metrics.py)."""
    ts_config = (server.run_dir / "ts-config.properties").read_text()
    assert f"metrics_config={server.run_dir / 'metrics.yaml'}" in ts_config
    declared = yaml.safe_load((server.run_dir / "metrics.yaml").read_text())["model_metrics"]
    assert set(load_specs()) <= {m["name"] for kind in declared.values() for m in kind}
    engine = Path(server.engine_source())
    assert (engine / "serving" / "metrics.py").is_file() and (engine / "serving" / "metrics.yaml").is_file()


def test_archive_ships_its_metrics_declarations(server):
    [mar] = Path(server.cmd[server.cmd.index("--model-store") + 1]).glob("*.mar")
    with zipfile.ZipFile(mar) as archive:
        shipped = yaml.safe_load(archive.read("metrics.yaml"))
    assert set(load_specs()) == {m["name"] for kind in shipped["model_metrics"].values() for m in kind}


def test_every_declared_metric_is_exposed(scraped, server):
    exposition = server.metrics()
    for name, spec in load_specs().items():
        assert f"# TYPE {name} {spec.type}" in exposition, name


def test_request_counts_by_kind_and_outcome(scraped):
    before, after, sent = scraped
    def delta(**labels):
        return value(after, "pathway_requests_total", **labels) - value(before, "pathway_requests_total", **labels)
    assert delta(kind="predict", outcome="ok") >= sent["predict"]
    assert delta(kind="explain", outcome="ok") >= sent["explain"]
    assert delta(kind="explain", outcome="rejected") >= sent["rejected"]


def test_rejected_requests_by_reason(scraped):
    before, after, _ = scraped
    for reason in ("target_out_of_range", "not_an_image"):
        grew = value(after, "pathway_rejected_requests_total", reason=reason, code="400") \
            - value(before, "pathway_rejected_requests_total", reason=reason, code="400")
        assert grew >= 1, reason


def test_explanation_latency_per_method_and_stage_times(scraped):
    _, after, _ = scraped
    for method in ("pathway_gradient", "gradient"):
        count = value(after, "pathway_explain_latency_seconds_count", method=method)
        total = value(after, "pathway_explain_latency_seconds_sum", method=method)
        assert count >= 1 and 0 < total / count < 600, method
    for stage, kind in (("decode", "predict"), ("engine", "predict"), ("encode", "predict"),
                        ("decode", "explain"), ("engine", "explain"), ("render", "explain"), ("encode", "explain")):
        assert value(after, "pathway_stage_seconds_count", stage=stage, kind=kind) >= 1, (stage, kind)
        assert value(after, "pathway_stage_seconds_sum", stage=stage, kind=kind) > 0, (stage, kind)
    # the engine is where the time goes for explanations
    assert value(after, "pathway_stage_seconds_sum", stage="engine", kind="explain") > \
        value(after, "pathway_stage_seconds_sum", stage="encode", kind="explain")
    # a histogram: cumulative buckets ending in +Inf == count
    inf = value(after, "pathway_explain_latency_seconds_bucket", method="gradient", le="+Inf")
    assert inf == value(after, "pathway_explain_latency_seconds_count", method="gradient")


def test_realised_sparsity_response_sizes_and_batch_sizes_are_plausible(scraped):
    _, after, _ = scraped
    count = value(after, "pathway_realised_sparsity_count", method="pathway_gradient")
    mean = value(after, "pathway_realised_sparsity_sum", method="pathway_gradient") / count
    assert count >= 1 and 0.7 <= mean < 1.0  # requested 0.7 (default) and 0.8; realised is never below
    predict_mb = value(after, "pathway_response_megabytes_sum", kind="predict") / \
        value(after, "pathway_response_megabytes_count", kind="predict")
    explain_mb = value(after, "pathway_response_megabytes_sum", kind="explain") / \
        value(after, "pathway_response_megabytes_count", kind="explain")
    assert 0.0001 < predict_mb < 0.01 and predict_mb < explain_mb < 5
    for name, labels in (("pathway_batch_requests", {}), ("pathway_engine_batch_images", {"kind": "explain"})):
        n = value(after, f"{name}_count", **labels)
        assert n >= 1 and 1 <= value(after, f"{name}_sum", **labels) / n <= 16, name


def test_oom_split_counter_is_declared_for_the_engine_and_the_handler(scraped, server):
    """Exposed from the start (TYPE line); samples appear once a split happens (counted splits: see
    test_handler_resilience). This traffic fits in memory many times over, so it split nothing."""
    before, after, _ = scraped
    assert "# TYPE pathway_oom_splits_total counter" in server.metrics()
    assert value(after, "pathway_oom_splits_total") - value(before, "pathway_oom_splits_total") == 0


def test_torchserve_own_metrics_are_kept(scraped, server):
    exposition = server.metrics()
    for name in ("ts_inference_requests_total", "Requests2XX", "Requests4XX", "PredictionTime"):
        assert f"# TYPE {name}" in exposition, name
