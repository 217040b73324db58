"""Several targets per image (``targets``, ``explain_top_k``): one batch, an ``explanations`` list, per-target files.

Each target's map must be the map a single-target request gets for that class; the numbers (Pearson, the
largest difference, whether the bits are equal) go to the run's measurements.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from handler.cli import run
from handler.errors import ExplainError
from handler.imaging import STRIP_PANEL_HEIGHT
from handler.schema import Limits, parse_options

ALL_OUTPUTS = "heatmap,overlay,attribution,pathway"


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(np.float64), b.ravel().astype(np.float64))[0, 1])


def agreement(a: np.ndarray, b: np.ndarray) -> dict:
    return {"pearson": round(pearson(a, b), 6), "max_abs_difference": float(np.abs(a - b).max()),
            "bit_equal": bool(np.array_equal(a, b))}


@pytest.fixture(scope="module")
def coffee_image(lite0_service, coffee):
    return lite0_service.decode(coffee)


@pytest.fixture(scope="module")
def top_three(lite0_service, coffee_image):
    """``explain_top_k: 3`` on the coffee photo, with every output."""
    [result] = lite0_service.explain([coffee_image], [parse_options({"explain_top_k": 3, "outputs": ALL_OUTPUTS})],
                                     attribution_dtype=np.float32)
    assert not isinstance(result, ExplainError), result
    return result


def test_explain_top_k_explains_the_most_probable_classes_in_order(top_three):
    document = top_three.document
    assert "explanation" not in document
    asked = [body["target"]["index"] for body in document["explanations"]]
    assert asked == [p["index"] for p in document["predictions"][:3]]
    assert asked[0] == 967  # espresso
    for body in document["explanations"]:
        assert set(body) >= {"method", "target", "reduce", "attribution_scale", "notes", "pathway"}


def test_each_target_map_equals_a_single_target_request_for_that_class(lite0_service, coffee_image, top_three,
                                                                        measurements):
    numbers = {}
    for part in top_three.parts:
        index = part.document["explanation"]["target"]["index"]
        [single] = lite0_service.explain([coffee_image], [parse_options({"target": index, "outputs": ALL_OUTPUTS})],
                                         attribution_dtype=np.float32)
        ours, theirs = part.document["explanation"]["target"], single.document["explanation"]["target"]
        assert (ours["index"], ours["label"]) == (theirs["index"], theirs["label"])
        assert ours["probability"] == pytest.approx(theirs["probability"], abs=1e-5)
        numbers[index] = agreement(part.attribution, single.attribution)
        assert numbers[index]["pearson"] >= 0.99, numbers
    measurements["several targets vs single target, service (coffee, top 3)"] = numbers


def test_targets_by_label_and_index_keep_the_order_asked(lite0_service, coffee_image):
    options = parse_options({"targets": "cup,967", "outputs": "heatmap"})
    [result] = lite0_service.explain([coffee_image], [options])
    assert [b["target"]["label"] for b in result.document["explanations"]] == ["cup", "espresso"]
    assert [sorted(p.artifacts) for p in result.parts] == [["heatmap"], ["heatmap"]]


def test_a_single_target_keeps_the_single_explanation_shape(lite0_service, coffee_image):
    [result] = lite0_service.explain([coffee_image], [parse_options({"target": "cup"})])
    assert "explanations" not in result.document and result.parts == []
    assert result.document["explanation"]["target"]["label"] == "cup"


def test_targets_of_several_images_run_as_one_engine_batch(lite0_service, coffee_image, chelsea, monkeypatch):
    """No per-target loop of passes: one explain_requests call sees every image's row once per target."""
    cat = lite0_service.decode(chelsea)
    calls = []
    original = lite0_service.explainer.explain_requests

    def recording(x, requests):
        calls.append([r.class_index for r in requests])
        return original(x, requests)

    monkeypatch.setattr(lite0_service.explainer, "explain_requests", recording)
    options = [parse_options({"targets": [967, 968], "method": "gradient", "outputs": "heatmap"}),
               parse_options({"target": 281, "method": "gradient", "outputs": "heatmap"})]
    results = lite0_service.explain([coffee_image, cat], options)
    assert calls == [[967, 968, 281]]
    assert [b["target"]["index"] for b in results[0].document["explanations"]] == [967, 968]
    assert results[1].document["explanation"]["target"]["index"] == 281


def test_default_response_stays_under_150_kb_per_explained_target(lite0_service, coffee_image, measurements):
    [result] = lite0_service.explain([coffee_image], [parse_options({"explain_top_k": 3})])
    size = len(json.dumps(result.inline()).encode())
    measurements["default explanation response bytes, 3 targets (coffee)"] = size
    assert size <= 3 * 150_000


def test_png_with_several_targets_is_one_labelled_strip_of_overlays(lite0_service, coffee_image):
    options = parse_options({"targets": [967, 968], "outputs": "overlay", "method": "gradient"})
    [result] = lite0_service.explain([coffee_image], [options])
    strip = Image.open(io.BytesIO(result.overlay_png())).convert("RGB")
    panel = Image.open(io.BytesIO(result.parts[0].artifacts["overlay"]))
    height = min(STRIP_PANEL_HEIGHT, panel.height)
    width = round(panel.width * height / panel.height)
    assert strip.width == 2 * width + 4 and strip.height > height  # side by side, under a caption bar
    bar = np.asarray(strip)[: strip.height - height]
    assert (bar == 255).all(axis=-1).mean() > 0.7 and (bar < 80).all(axis=-1).any()  # black text on white
    assert np.array_equal(np.asarray(strip)[strip.height - height:, :width],
                          np.asarray(panel.convert("RGB").resize((width, height), Image.BILINEAR)))


@pytest.mark.parametrize("raw, code", [
    ({"targets": ["espresso", 967]}, "duplicate_target"),
    ({"targets": "967, 968, 967"}, "duplicate_target"),
    ({"targets": ["cup", "no such class"]}, "unknown_label"),
    ({"targets": "auto,967"}, "invalid_target"),
    ({"targets": [5000]}, "target_out_of_range"),
    ({"explain_top_k": 11}, "too_many_targets"),
    ({"targets": list(range(11))}, "too_many_targets"),
    ({"explain_top_k": 0}, "invalid_option"),
    ({"explain_top_k": "three"}, "invalid_option"),
    ({"targets": "967,,968"}, "invalid_target"),
    ({"targets": {"a": 1}}, "invalid_target"),
    ({"target": 1, "explain_top_k": 2}, "conflicting_targets"),
])
def test_bad_targets_are_refused_with_their_own_type(lite0_service, raw, code):
    job = lite0_service.prepare([b""], [raw], explain=True)
    assert job.error is not None and job.error.code == code, job.error


def test_pass_budget_counts_every_target(lite0_service):
    saved = lite0_service.limits
    try:
        lite0_service.limits = replace(saved, max_passes_per_request=5)
        assert lite0_service.prepare([b""], [{"targets": [967, 968]}], explain=True).error.code != "over_limit"
        job = lite0_service.prepare([b""], [{"targets": [967, 968, 925]}], explain=True)
        assert job.error.code == "over_limit" and "6 forward/backward passes" in job.error.message
        job = lite0_service.prepare([b""], [{"explain_top_k": 2}], explain=True)  # 2 x 2 + the ranking forward
        assert job.error.code != "over_limit"  # refused only for the empty image
        job = lite0_service.prepare([b""], [{"explain_top_k": 3}], explain=True)
        assert job.error.code == "over_limit" and "7 forward/backward passes" in job.error.message
    finally:
        lite0_service.limits = saved


def test_max_targets_per_request_comes_from_the_model_config():
    limits = Limits.from_config({"max_targets_per_request": 2})
    with pytest.raises(ExplainError) as caught:
        parse_options({"targets": [1, 2, 3]}, limits)
    assert caught.value.code == "too_many_targets" and "at most 2" in str(caught.value)


def test_visualisation_options_arrive_in_the_one_parsed_request():
    options = parse_options({"polarity": "both", "smooth": "0", "clip-percent-lower": "50", "overlay_type": "none"})
    settings = options.visualization
    assert settings.resolved_colormap == "pink_green"  # polarity both, no colormap: the diverging map
    assert (settings.smooth, settings.clip_percent_lower, settings.overlay_type) == (0.0, 50.0, "none")
    assert parse_options({}).visualization.resolved_colormap == "inferno"


# -- the CLI -------------------------------------------------------------------------------------------


def test_cli_explain_top_k_writes_per_target_files_that_agree_with_target_runs(tmp_path, photos, measurements):
    """The acceptance check: --explain-top-k 3 --save-attribution, then --target <index> for each class."""
    several = tmp_path / "several"
    (several).mkdir()
    (several / "coffee.1.heatmap.png").write_bytes(b"stale")  # a per-target file from an earlier run
    (several / "coffee.attribution.npy").write_bytes(b"stale")
    assert run(["--out", str(several), "--explain-top-k", "3", "--save-attribution", str(photos["coffee"])]) == 0
    document = json.loads((several / "coffee.json").read_text())
    asked = [body["target"]["index"] for body in document["explanations"]]
    assert asked == [p["index"] for p in document["predictions"][:3]]
    expected = {"coffee.json"} | {f"coffee.{i}.{s}" for i in asked
                                  for s in ("heatmap.png", "overlay.png", "attribution.npy")}
    assert {p.name for p in several.iterdir()} == expected
    for body, index in zip(document["explanations"], asked):
        assert body["attribution"]["path"] == f"coffee.{index}.attribution.npy"
    assert run(["--verify", str(several / "coffee.json"), str(photos["coffee"])]) == 0  # every target recomputed
    numbers = {}
    for index in asked:
        single = tmp_path / str(index)
        assert run(["--out", str(single), "--target", str(index), "--save-attribution", str(photos["coffee"])]) == 0
        numbers[index] = agreement(np.load(several / f"coffee.{index}.attribution.npy"),
                                   np.load(single / "coffee.attribution.npy"))
        assert numbers[index]["pearson"] >= 0.99, numbers
    measurements["several targets vs --target runs, CLI (coffee, --explain-top-k 3)"] = numbers
    # a single-target run into the same folder removes the per-target files of the stem
    assert run(["--out", str(several), "--target", "cup", str(photos["coffee"])]) == 0
    assert {p.name for p in several.iterdir()} == {"coffee.json", "coffee.heatmap.png", "coffee.overlay.png"}


def test_cli_comma_separated_targets(tmp_path, photos):
    assert run(["--out", str(tmp_path), "--target", "cup,espresso", "--method", "gradient",
                str(photos["coffee"])]) == 0
    document = json.loads((tmp_path / "coffee.json").read_text())
    assert [b["target"]["index"] for b in document["explanations"]] == [968, 967]
    assert (tmp_path / "coffee.968.overlay.png").is_file() and not (tmp_path / "coffee.overlay.png").exists()


@pytest.mark.parametrize("args, message", [
    (["--target", "cup,cup"], "name each class once"),
    (["--target", "cup,no such class"], "unknown class label 'no such class'"),
    (["--explain-top-k", "11"], "explain_top_k = 11"),
    (["--explain-top-k", "2", "--target", "cup"], "give one of target, targets and explain_top_k"),
])
def test_cli_bad_targets_fail_in_one_line_before_any_work(tmp_path, photos, capsys, args, message):
    assert run(["--out", str(tmp_path), *args, str(photos["coffee"])]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "coffee.json").exists()


# -- a real TorchServe ----------------------------------------------------------------------------------


def npy_of(output: dict) -> np.ndarray:
    import base64

    return np.load(io.BytesIO(base64.b64decode(output["data"]))).astype(np.float32)


@pytest.mark.server
def test_served_several_targets_equal_single_target_requests(server, coffee, measurements):
    import base64

    photo = base64.b64encode(coffee).decode()
    route = "/explanations/efficientnet_lite0"
    reply = server.post(route, json={"image": photo, "explain_top_k": 3, "outputs": ["attribution"]})
    assert reply.status_code == 200, reply.text[:300]
    document = reply.json()
    asked = [e["target"]["index"] for e in document["explanations"]]
    assert asked == [p["index"] for p in document["predictions"][:3]]
    numbers = {}
    for body, index in zip(document["explanations"], asked):
        single = server.post(route, data=coffee, headers={"Content-Type": "application/octet-stream",
                                                          "X-Explain-Target": str(index),
                                                          "X-Explain-Outputs": "attribution"})
        assert single.status_code == 200, single.text[:300]
        numbers[index] = agreement(npy_of(body["attribution"]), npy_of(single.json()["explanation"]["attribution"]))
        assert numbers[index]["pearson"] >= 0.99, numbers
    measurements["several targets vs single target, TorchServe (coffee, top 3, float16 maps)"] = numbers
    strip = server.post(route, data=coffee, headers={"Content-Type": "application/octet-stream",
                                                     "Accept": "image/png", "X-Explain-Targets": "espresso,cup"})
    assert strip.status_code == 200 and strip.headers["content-type"] == "image/png"
    assert strip.headers["X-Explain-Target-Index"] == "967,968"
    assert Image.open(io.BytesIO(strip.content)).width > 2 * Image.open(io.BytesIO(strip.content)).height
