"""Visualisation settings: the default overlay is plainly visible, every setting does what it says, bad values fail.

Visibility is measured against the photo, inside the window the model saw: the mean change of the RGB
channels (0-255) over the pixels whose |attribution|, resized to the photo's size, is in its top 10 %, and
the same over the bottom half.
"""

import json

import numpy as np
import pytest
from PIL import Image

from handler.cli import run
from handler.errors import InvalidOption
from handler.imaging import (COLORMAPS, VISUALIZATION_OPTIONS, Preprocessor, VisualizationSettings, colormap_lut,
                             display_values, render_heatmap, render_overlay)
from handler.models import get_spec
from handler.samples import SAMPLE_PHOTOS

PREPROCESSOR = Preprocessor(get_spec("efficientnet_lite0").preprocessing)


def visibility(photo: Image.Image, overlay: Image.Image, attribution: np.ndarray, resample) -> tuple:
    """(mean RGB change over the top 10 % of |attribution|, over its bottom half), at the photo's size."""
    box = PREPROCESSOR.crop_box(photo.size)
    left, top = int(round(box.left)), int(round(box.top))
    right, bottom = min(photo.width, int(round(box.right))), min(photo.height, int(round(box.bottom)))
    before = np.asarray(photo.convert("RGB"), dtype=np.float32)[top:bottom, left:right]
    after = np.asarray(overlay.convert("RGB"), dtype=np.float32)[top:bottom, left:right]
    change = np.abs(after - before).mean(axis=-1)
    magnitude = np.asarray(Image.fromarray(np.abs(attribution).astype(np.float32), "F")
                           .resize((right - left, bottom - top), resample))
    strong = magnitude >= np.percentile(magnitude, 90)
    weak = magnitude <= np.percentile(magnitude, 50)
    return float(change[strong].mean()), float(change[weak].mean())


@pytest.fixture(scope="module")
def cli_defaults(tmp_path_factory, photos):
    """``pathway-explain`` with default settings on every sample photo (the real EfficientNet-Lite0)."""
    out = tmp_path_factory.mktemp("defaults")
    assert run(["--out", str(out), "--save-attribution", *(str(photos[name]) for name in SAMPLE_PHOTOS)]) == 0
    return out


def test_default_overlay_makes_the_explanation_plainly_visible_on_every_sample_photo(cli_defaults, photos,
                                                                                      measurements):
    measured = {}
    for name in SAMPLE_PHOTOS:
        photo = Image.open(photos[name])
        overlay = Image.open(cli_defaults / f"{name}.overlay.png")
        attribution = np.load(cli_defaults / f"{name}.attribution.npy")
        assert overlay.size == photo.size
        for resample in (Image.NEAREST, Image.BILINEAR):  # however the map is brought to the photo's size
            strong, weak = visibility(photo, overlay, attribution, resample)
            assert strong >= 60, f"{name}: the top 10 % changes by {strong:.1f}/255 only"
            assert strong >= 3 * weak, f"{name}: top 10 % {strong:.1f} against bottom half {weak:.1f}"
        measured[name] = {"top10_change": round(strong, 1), "bottom50_change": round(weak, 2)}
    measurements["default overlay visibility (bilinear)"] = measured


def test_outside_the_model_window_the_default_overlay_leaves_the_photo_alone(cli_defaults, photos):
    photo = Image.open(photos["coffee"]).convert("RGB")  # 600x400: the model saw x in [125, 475)
    overlay = np.asarray(Image.open(cli_defaults / "coffee.overlay.png").convert("RGB"))
    assert (overlay[:, :125] == np.asarray(photo)[:, :125]).all()


def test_the_default_json_response_stays_compact(lite0_service, coffee, measurements):
    from handler.schema import parse_options

    image = lite0_service.decode(coffee)
    [result] = lite0_service.explain([image], [parse_options({})])
    size = len(json.dumps(result.inline()).encode())
    measurements["default explanation response bytes (coffee)"] = size
    assert "heatmap" in result.artifacts and size <= 150_000


# ---------------------------------------------------------------------------
# What each setting does
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sparse_map():
    """A sparse, heavy-tailed signed map like pathway gradient's, with a strong positive and negative blob."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((64, 64)).astype(np.float32) ** 3 * 0.01
    a[10:20, 10:20] += 1.0
    a[40:50, 40:50] -= 1.0
    return a / np.abs(a).max()


@pytest.fixture(scope="module")
def grey_photo():
    return Image.new("RGB", (64, 64), (128, 128, 128))




def box_of(size):
    from handler.imaging import CropBox

    return CropBox(0, 0, size[0], size[1])


def test_clip_percentiles_bound_what_is_shown(sparse_map):
    values = display_values(sparse_map, VisualizationSettings(smooth=0))
    magnitude = np.abs(sparse_map)
    assert (values[magnitude <= np.percentile(magnitude, 62)] == 0).all()
    assert (values[magnitude >= np.percentile(magnitude, 99.9)] == 1).all()
    wider = display_values(sparse_map, VisualizationSettings(smooth=0, clip_percent_lower=20))
    assert (wider > 0).mean() > (values > 0).mean() + 0.3


def test_smoothing_is_for_display_only(sparse_map):
    original = sparse_map.copy()
    sharp = np.asarray(render_heatmap(sparse_map, VisualizationSettings(smooth=0)))
    smooth = np.asarray(render_heatmap(sparse_map, VisualizationSettings(smooth=3)))
    assert (sparse_map == original).all()
    assert np.abs(smooth.astype(int) - sharp).mean() > 5
    # a blur spreads the blobs' intensity to their surroundings
    assert smooth[8, 8:22].min() > sharp[8, 8:22].min()


def test_polarity_both_defaults_to_pink_green_positive_green_negative_pink(grey_photo, sparse_map):
    settings = VisualizationSettings(polarity="both")
    assert settings.resolved_colormap == "pink_green"
    overlay = np.asarray(render_overlay(grey_photo, sparse_map, box_of(grey_photo.size), settings)).astype(int)
    positive, negative = overlay[12:18, 12:18].mean((0, 1)), overlay[42:48, 42:48].mean((0, 1))
    assert positive[1] > positive[0] + 40 and positive[1] > positive[2] + 40  # green
    assert negative[0] > negative[1] + 80 and negative[2] > negative[1] + 40  # pink / magenta


@pytest.mark.parametrize("overlay_type", ["original", "grayscale", "mask_black", "none"])
def test_overlay_types_change_what_lies_under_the_colours(sparse_map, overlay_type):
    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), "RGB")
    out = np.asarray(render_overlay(photo, sparse_map, box_of(photo.size),
                                    VisualizationSettings(overlay_type=overlay_type, smooth=0)))
    weak = np.abs(sparse_map) <= np.percentile(np.abs(sparse_map), 50)
    src = np.asarray(photo)
    if overlay_type == "original":
        assert (out[weak] == src[weak]).all()
    elif overlay_type == "grayscale":
        assert (out[weak] == np.asarray(photo.convert("L"))[weak][:, None]).all()
    else:
        assert (out[weak] == 0).all()
    if overlay_type == "mask_black":  # the photo itself shows through where the attribution is strongest
        assert (out[12:18, 12:18] == src[12:18, 12:18]).all()
    else:
        assert np.abs(out[12:18, 12:18].astype(int) - src[12:18, 12:18]).mean() > 30


def test_outlines_draw_contours_not_areas(grey_photo, sparse_map):
    photo = grey_photo.resize((640, 640))
    pixels = np.asarray(render_overlay(photo, sparse_map, box_of(photo.size), VisualizationSettings(smooth=0)))
    lines = np.asarray(render_overlay(photo, sparse_map, box_of(photo.size),
                                      VisualizationSettings(visualization="outlines", smooth=0)))
    changed_lines = (lines != np.asarray(photo)).any(-1)
    changed_pixels = (pixels != np.asarray(photo)).any(-1)
    assert changed_lines[90:110, 150].any()  # the top edge of the positive blob (rows 100-200 at 10x)
    assert not changed_lines[130:170, 130:170].any()  # its inside is left alone
    assert 0 < changed_lines.mean() < 0.5 * changed_pixels.mean()


# ---------------------------------------------------------------------------
# Colormaps
# ---------------------------------------------------------------------------


def test_colormaps_are_matplotlibs_exact_lookup_tables():
    matplotlib = pytest.importorskip("matplotlib")  # installed with captum, a test dependency
    reference = {"gray": "gray", "inferno": "inferno", "jet": "jet", "magma": "magma", "pink_green": "PiYG",
                 "red_blue": "RdBu_r", "viridis": "viridis"}
    assert set(COLORMAPS) == set(reference)
    for ours, theirs in reference.items():
        expected = matplotlib.colormaps[theirs](np.linspace(0, 1, 256))[:, :3] * 255
        assert np.abs(colormap_lut(ours).astype(float) - expected).max() <= 0.5 + 1e-6, ours


def test_diverging_maps_put_zero_in_the_middle_and_positive_at_the_top():
    green_top, pink_bottom = colormap_lut("pink_green")[-1], colormap_lut("pink_green")[0]
    assert green_top[1] > green_top[0] and pink_bottom[0] > pink_bottom[1]
    assert colormap_lut("red_blue")[-1][0] > colormap_lut("red_blue")[-1][2]  # positive red, as before
    assert colormap_lut("pink_green")[128].min() > 230  # near white at zero


# ---------------------------------------------------------------------------
# Bad values
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("raw, message", [
    ({"visualization": "dots"}, "visualization must be one of pixels, outlines, not 'dots'"),
    ({"overlay_type": "sepia"}, "overlay_type must be one of original, grayscale, mask_black, none"),
    ({"colormap": "rainbow"}, "colormap must be one of"),
    ({"polarity": "up"}, "polarity must be one of"),
    ({"clip_percent_upper": "101"}, "clip_percent_upper must be at most 100.0, got 101.0"),
    ({"clip_percent_lower": "-1"}, "clip_percent_lower must be at least 0.0"),
    ({"clip_percent_upper": "lots"}, "clip_percent_upper must be a number, not 'lots'"),
    ({"clip_percent_lower": 80, "clip_percent_upper": 70}, "clip_percent_lower (80) must be below clip_percent_upper (70)"),
    ({"smooth": "inf"}, "smooth must be a number"),
    ({"smooth": 100}, f"smooth must be at most {VISUALIZATION_OPTIONS['smooth'].maximum}"),
    ({"opacity": 1}, "unknown visualisation setting 'opacity'"),
])
def test_bad_settings_are_refused_with_a_specific_message(raw, message):
    with pytest.raises(InvalidOption) as caught:
        VisualizationSettings.from_options(raw)
    assert message in str(caught.value)


def test_unknown_colormap_keeps_its_error_type():
    with pytest.raises(InvalidOption) as caught:
        VisualizationSettings.from_options({"colormap": "rainbow"})
    assert caught.value.code == "unknown_colormap"


@pytest.mark.parametrize("args, message", [
    (["--visualization", "dots"], "visualization must be one of pixels, outlines"),
    (["--clip-percent-upper", "150"], "clip_percent_upper must be at most 100.0"),
    (["--clip-percent-lower", "99.95"], "clip_percent_lower (99.95) must be below clip_percent_upper (99.9)"),
    (["--overlay-type", "sepia"], "overlay_type must be one of"),
    (["--smooth", "-2"], "smooth must be at least 0.0"),
    (["--colormap", "rainbow"], "unknown colormap 'rainbow'"),
])
def test_bad_visualisation_flags_fail_in_one_line_before_any_work(tmp_path, photos, capsys, args, message):
    assert run(["--out", str(tmp_path), *args, str(photos["coffee"])]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "coffee.json").exists()


def test_visualisation_flags_reach_the_written_pngs(tmp_path, photos, cli_defaults):
    assert run(["--out", str(tmp_path), "--visualization", "outlines", "--overlay-type", "grayscale",
                "--polarity", "both", "--smooth", "3", "--clip-percent-lower", "80", str(photos["coffee"])]) == 0
    overlay = np.asarray(Image.open(tmp_path / "coffee.overlay.png").convert("RGB")).astype(int)
    default = np.asarray(Image.open(cli_defaults / "coffee.overlay.png").convert("RGB")).astype(int)
    assert (overlay[:, :125].std(-1) == 0).all()  # grayscale outside the model window too
    assert not (overlay == default).all()
    heatmap = Image.open(tmp_path / "coffee.heatmap.png")
    assert tuple(heatmap.getpalette()[:3]) == tuple(colormap_lut("pink_green")[0])


@pytest.mark.server
def test_the_served_overlay_uses_the_same_visible_defaults(server, coffee, photos, cli_defaults):
    import io

    reply = server.post("/explanations/efficientnet_lite0", data=coffee,
                        headers={"Content-Type": "application/octet-stream", "Accept": "image/png"})
    assert reply.status_code == 200 and reply.headers["content-type"] == "image/png"
    served = Image.open(io.BytesIO(reply.content))
    strong, weak = visibility(Image.open(photos["coffee"]), served, np.load(cli_defaults / "coffee.attribution.npy"),
                              Image.BILINEAR)
    assert strong >= 60 and strong >= 3 * weak
