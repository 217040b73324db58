"""``pathway-explain``: outputs per image, the shared schema, and clear errors with non-zero exits."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from handler.cli import run


@pytest.fixture(scope="module")
def explained(tmp_path_factory, photos):
    out = tmp_path_factory.mktemp("out")
    code = run(["--out", str(out), "--save-attribution", "--sparsity", "0.7", str(photos["coffee"]),
                str(photos["chelsea"])])
    assert code == 0
    return out


def test_writes_document_heatmap_overlay_and_attribution_per_image(explained, photos):
    for stem in ("coffee", "chelsea"):
        doc = json.loads((explained / f"{stem}.json").read_text())
        assert len(doc["predictions"]) == 5
        assert {"index", "label", "probability"} <= set(doc["predictions"][0])
        assert doc["explanation"]["method"] == "pathway_gradient"
        assert doc["explanation"]["pathway"]["requested_sparsity"] == 0.7
        assert doc["preprocessing"]["crop"] == 224
        assert doc["explanation"]["heatmap"] == {"media_type": "image/png", "path": f"{stem}.heatmap.png"}
        heat = Image.open(explained / f"{stem}.heatmap.png")
        assert heat.size == (224, 224)
        overlay = Image.open(explained / f"{stem}.overlay.png")
        assert overlay.size == Image.open(photos[stem]).size
        attribution = np.load(explained / f"{stem}.attribution.npy")
        assert attribution.dtype == np.float32 and attribution.shape == (224, 224)
        assert np.abs(attribution).max() == pytest.approx(1.0)


def test_heatmap_is_hot_where_the_attribution_is_large(explained):
    attribution = np.abs(np.load(explained / "coffee.attribution.npy"))
    heat = np.asarray(Image.open(explained / "coffee.heatmap.png"))  # palette indices = intensity
    hot, cold = attribution > np.percentile(attribution, 99), attribution < np.percentile(attribution, 50)
    assert heat[hot].mean() > 4 * heat[cold].mean()


def test_explicit_target_by_index_and_by_label(tmp_path, photos):
    assert run(["--out", str(tmp_path), "--target", "968", str(photos["coffee"])]) == 0
    assert json.loads((tmp_path / "coffee.json").read_text())["explanation"]["target"]["label"] == "cup"
    assert run(["--out", str(tmp_path), "--target", "tiger cat", str(photos["chelsea"])]) == 0
    assert json.loads((tmp_path / "chelsea.json").read_text())["explanation"]["target"]["index"] == 282


def test_same_file_name_twice_is_not_overwritten(tmp_path, photos):
    other = tmp_path / "copy"
    other.mkdir()
    (other / "coffee.png").write_bytes(photos["coffee"].read_bytes())
    assert run(["--out", str(tmp_path / "o"), "--method", "gradient", str(photos["coffee"]),
                str(other / "coffee.png")]) == 0
    assert (tmp_path / "o" / "coffee.json").exists() and (tmp_path / "o" / "coffee-2.json").exists()


@pytest.mark.parametrize("args, code, message", [
    (["--model", "no_such_model"], 2, "unknown model 'no_such_model'"),
    (["--target", "5000"], 2, "target 5000 is out of range"),
    (["--target", "not a class"], 2, "unknown class label"),
    (["--sparsity", "1.0"], 2, "sparsity must be in [0, 1)"),
    (["--sparsity", "-0.1"], 2, "sparsity must be in [0, 1)"),
    (["--sparsity", "lots"], 2, "sparsity must be a number"),
    (["--method", "magic"], 2, "unknown method 'magic'"),
    (["--reduce", "mean"], 2, "unknown channel reduction 'mean'"),
])
def test_bad_options_fail_before_any_work(tmp_path, photos, capsys, args, code, message):
    assert run(["--out", str(tmp_path), *args, str(photos["coffee"])]) == code
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "coffee.json").exists()


def test_missing_and_non_image_files_fail_alone(tmp_path, photos, capsys):
    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture")
    code = run(["--out", str(tmp_path / "o"), str(tmp_path / "missing.png"), str(text), str(photos["coffee"])])
    assert code == 1
    err = capsys.readouterr().err
    assert "missing.png: no such file" in err
    assert "notes.jpg: the data is not an image" in err
    assert (tmp_path / "o" / "coffee.json").exists()  # the good image is still explained


def test_installed_command_reports_errors_without_traceback(tmp_path):
    exe = Path(sys.executable).with_name("pathway-explain")
    assert exe.exists(), "the set-up installs pathway-explain into the virtual environment"
    proc = subprocess.run([str(exe), "--out", str(tmp_path), str(tmp_path / "nope.jpg")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "nope.jpg: no such file" in proc.stderr and "Traceback" not in proc.stderr


def test_selection_options_pass_through(tmp_path, photos):
    assert run(["--out", str(tmp_path), "--option", "signed=true", str(photos["coffee"])]) == 0
    pathway = json.loads((tmp_path / "coffee.json").read_text())["explanation"]["pathway"]
    assert pathway["selection"] == "contribution_signed"


def test_overlay_of_a_huge_photo_is_scaled_to_the_limit(photos):
    import io

    from handler import ExplanationService, load_model, parse_options
    from handler.schema import Limits

    service = ExplanationService(load_model("efficientnet_lite0"), limits=Limits(max_overlay_pixels=60_000))
    image = service.decode(photos["coffee"].read_bytes())  # 600 x 400 = 240 000 pixels
    [result] = service.explain([image], [parse_options({"outputs": ["overlay"]})])
    overlay = Image.open(io.BytesIO(result.artifacts["overlay"]))
    assert overlay.size == (300, 200)
    assert result.document["explanation"]["overlay_size"] == [300, 200]


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory):
    import torch
    import torchvision

    folder = tmp_path_factory.mktemp("weights")
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), folder / "resnet18.pt")
    torch.save(torchvision.models.resnet34(weights=None).state_dict(), folder / "resnet34.pt")
    (folder / "ten.txt").write_text("\n".join(f"class {i}" for i in range(10)) + "\n")
    return folder


def test_state_dict_of_another_architecture_is_one_line_and_exit_2(tmp_path, photos, resnet18_weights):
    exe = Path(sys.executable).with_name("pathway-explain")
    proc = subprocess.run([str(exe), "--arch", "resnet18", "--weights", str(resnet18_weights / "resnet34.pt"),
                           "--out", str(tmp_path), str(photos["coffee"])], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("pathway-explain: error: weights do not match")
    assert not list(tmp_path.iterdir())  # before any work


def test_class_names_that_do_not_fit_the_head_name_both_counts(tmp_path, photos, resnet18_weights, capsys):
    code = run(["--arch", "resnet18", "--weights", str(resnet18_weights / "resnet18.pt"), "--labels",
                str(resnet18_weights / "ten.txt"), "--out", str(tmp_path), str(photos["coffee"])])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "the class names list 10 classes but the weights' classifier fc.weight has 1000 outputs" in err


def test_usage_errors_are_one_line(tmp_path, photos, capsys):
    with pytest.raises(SystemExit) as exit_:
        run(["--no-such-flag", str(photos["coffee"])])
    assert exit_.value.code == 2
    assert capsys.readouterr().err == "pathway-explain: error: unrecognized arguments: --no-such-flag (see --help)\n"
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    with pytest.raises(SystemExit):
        run(["--out", str(not_a_dir), str(photos["coffee"])])
    assert capsys.readouterr().err.count("\n") == 1


def test_renamed_imagenet_label_alone_is_refused_naming_both_classes(tmp_path, photos, capsys):
    assert run(["--out", str(tmp_path), "--target", "crane", str(photos["coffee"])]) == 2
    err = capsys.readouterr().err
    assert "134 'crane bird'" in err and "517 'crane'" in err and err.count("\n") == 1
    assert run(["--out", str(tmp_path), "--target", "crane bird", "--method", "gradient", str(photos["coffee"])]) == 0
    assert json.loads((tmp_path / "coffee.json").read_text())["explanation"]["target"]["index"] == 134


def test_list_labels_prints_every_class_and_the_shared_names(capsys):
    assert run(["--list-labels"]) == 0
    lines = capsys.readouterr().out.splitlines()
    classes = [line.split("\t") for line in lines if not line.startswith("#")]
    assert len(classes) == 1000 and classes[281] == ["281", "tabby"] and classes[134] == ["134", "crane bird"]
    assert any("'crane'" in line and "134, 517" in line for line in lines if line.startswith("#"))
    assert run(["--list-labels", "synthetic_digits_cnn"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 10


def test_rerun_into_the_same_out_leaves_no_file_of_the_earlier_run(tmp_path, photos, capsys):
    out = tmp_path / "out"
    coffee = str(photos["coffee"])
    assert run(["--out", str(out), "--method", "gradient", "--save-attribution", coffee]) == 0
    assert (out / "coffee.attribution.npy").exists()
    assert run(["--out", str(out), "--method", "gradient", coffee]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["coffee.heatmap.png", "coffee.json", "coffee.overlay.png"]
    # an image that now fails leaves nothing of its earlier run either
    broken = tmp_path / "coffee.png"
    broken.write_text("not a picture any more")
    assert run(["--out", str(out), "--method", "gradient", str(broken)]) == 1
    assert list(out.iterdir()) == []


def test_an_image_whose_outputs_cannot_all_be_written_leaves_no_file(tmp_path, photos, capsys, monkeypatch):
    """A full disk while writing the overlay: what was written of that image (its heatmap, the half overlay) is
    removed, as the README promises, and the other image is written whole."""
    import errno
    from pathlib import Path

    write_bytes = Path.write_bytes

    def disk_full_at_coffees_overlay(self, data):
        if self.name == "coffee.overlay.png":
            write_bytes(self, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(self, data)

    monkeypatch.setattr(Path, "write_bytes", disk_full_at_coffees_overlay)
    code = run(["--out", str(tmp_path), "--method", "gradient", str(photos["coffee"]), str(photos["chelsea"])])
    assert code == 1
    assert "coffee.png: cannot write its outputs: No space left on device" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chelsea.heatmap.png", "chelsea.json", "chelsea.overlay.png"]


def test_a_layer_grad_cam_cannot_use_is_a_bad_option_exit_2_said_once(tmp_path, photos, capsys):
    code = run(["--out", str(tmp_path), "--method", "grad_cam", "--option", "layer=no.such.layer",
                str(photos["coffee"]), str(photos["chelsea"])])
    err = capsys.readouterr().err
    assert code == 2 and err.count("no.such.layer") == 1 and len(err.strip().splitlines()) == 1, err


def test_an_empty_file_is_said_in_a_files_terms(tmp_path, photos, capsys):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    assert run(["--out", str(tmp_path / "out"), "--method", "gradient", str(empty), str(photos["coffee"])]) == 1
    assert f"pathway-explain: error: {empty}: the file is empty" in capsys.readouterr().err
