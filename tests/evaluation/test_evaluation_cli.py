"""``pathway-eval``: writes its results for one photo and one method; bad input exits non-zero with a message."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest

from handler.evaluation.cli import run

ROOT = Path(__file__).resolve().parents[2]


def test_console_script_is_declared():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["pathway-eval"] == "handler.evaluation.cli:main"


def test_one_photo_one_method_writes_results_and_summary(tmp_path, photos):
    out = tmp_path / "eval"
    code = run([str(photos["coffee"]), "--method", "gradient", "--protocol", "lerf_morf", "--fractions", "0.01,0.1",
                "--save-maps", "--quiet", "--out", str(out)])
    assert code == 0
    record = json.loads((out / "results.json").read_text())
    assert record["model"] == "efficientnet_lite0" and record["images"]["names"] == ["coffee"]
    assert record["images"]["targets"] == [967]  # espresso
    lm = record["methods"]["gradient"]["lerf_morf"]
    assert lm["fractions"] == [0.01, 0.1]
    assert len(lm["per_image"]["lerf"][0]) == 2
    assert all(0 <= v for v in lm["lerf"] + lm["morf"])
    assert record["command"].startswith("pathway-eval ")
    assert record["provenance"]["torch"]
    summary = (out / "summary.md").read_text()
    assert "| `gradient` |" in summary and "LeRF 10%" in summary
    maps = np.load(out / "maps.npz")
    assert maps["map0"].shape == (1, 224, 224) and maps["methods"].tolist() == ["gradient"]
    assert maps["images"].shape == (1, 224, 224, 3)


def test_synthetic_pointing_game_run(tmp_path):
    out = tmp_path / "synthetic"
    code = run(["--model", "synthetic_digits_cnn", "--synthetic", "6", "--target", "label", "--method", "gradient",
                "--method", "pathway_gradient", "--protocol", "pointing_game", "--quiet", "--out", str(out)])
    assert code == 0
    record = json.loads((out / "results.json").read_text())
    assert record["images"]["boxes"] and len(record["images"]["boxes"]) == 6
    assert record["images"]["targets"] == record["images"]["labels"]
    for label in ("gradient", "pathway_gradient"):
        pg = record["methods"][label]["pointing_game"]
        assert 0 <= pg["pointing_accuracy"] <= 1 and 0 <= pg["energy_in_box"] <= 1
        assert pg["tolerance_px"] == pytest.approx(7.5)


@pytest.mark.parametrize("argv, message", [
    (["--samples", "--method", "nope"], "unknown explanation method 'nope'"),
    (["--samples", "--method", "gradient@contribution"], "takes no selection"),
    (["--samples", "--protocol", "roar"], "unknown protocol 'roar'"),
    (["--samples", "--protocol", "pointing_game"], "needs ground-truth boxes"),
    (["--samples", "--target", "label"], "needs ground-truth labels"),
    (["--samples", "--sparsity", "1.5"], "--sparsity must be in [0, 1)"),
    (["--samples", "--fractions", "0.1,2"], "--fractions must be numbers in (0, 1)"),
    (["--samples", "--selection", "nope", "--protocol", "pathway_overlap"], "unknown pathway selection"),
    (["/no/such/photo.png"], "no such file"),
    (["--samples", "--model", "no_such_model"], "unknown model"),
])
def test_bad_input_exits_2_with_a_message(tmp_path, capsys, argv, message):
    assert run(argv + ["--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("argv, message", [
    (["--out", "x"], "give exactly one image source"),
    (["--samples", "--synthetic", "3", "--out", "x"], "give exactly one image source"),
    (["--samples"], "--out DIR is required"),
    (["--samples", "--synthetic", "x"], "invalid int value"),
])
def test_usage_errors_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        run(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_entry_point_reports_errors_without_a_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "handler.evaluation.cli", "--samples", "--method", "nope",
                             "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert result.stderr.startswith("pathway-eval: error:") and "Traceback" not in result.stderr


def test_list_names_the_protocols_and_variants(capsys):
    assert run(["--list"]) == 0
    out = capsys.readouterr().out
    for word in ("lerf_morf", "insertion_deletion", "randomisation", "pointing_game", "pathway_overlap",
                 "pathway_gradient@contribution", "gradient"):
        assert word in out


def test_an_image_that_cannot_be_read_is_named_in_one_line(tmp_path, capsys):
    from handler.samples import sample_photo

    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(sample_photo("coffee").read_bytes()[:5000])
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    for bad, says in ((truncated, "truncated or corrupt"), (empty, "the file is empty")):
        code = run([str(sample_photo("chelsea")), str(bad), "--method", "gradient", "--out", str(tmp_path / "o"),
                    "--quiet"])
        err = capsys.readouterr().err
        assert code == 2 and err.startswith(f"pathway-eval: error: {bad}: ") and says in err, err
        assert len(err.strip().splitlines()) == 1
