"""``pathway-archive --arch``: the archive's spec states the preprocessing it took, and the builder says which."""

from __future__ import annotations

import json
import zipfile

import pytest

from handler.serving import archive


@pytest.mark.parametrize("architecture, says, mean", [
    ("timm:vit_tiny_patch16_224", "as timm:vit_tiny_patch16_224's published weights were evaluated: resize 248, "
                                  "crop 224, bicubic, mean [0.5, 0.5, 0.5]", [0.5, 0.5, 0.5]),
    ("handler:digits_cnn", "the defaults: handler:digits_cnn publishes none: resize 256, crop 224, bilinear",
     [0.485, 0.456, 0.406]),
])
def test_an_archive_built_from_an_architecture_states_and_says_its_preprocessing(tmp_path, capsys, architecture,
                                                                                says, mean):
    archive.main(["--arch", architecture, "--name", "mine", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert out.strip() == str(tmp_path / "mine.mar")
    assert err.startswith("pathway-archive: preprocessing ") and says in err and len(err.splitlines()) == 1
    with zipfile.ZipFile(tmp_path / "mine.mar") as mar:
        spec = json.loads(mar.read("model_spec.json"))
    assert spec["preprocessing"]["mean"] == pytest.approx(mean)
