"""The micro-choices benchmark compares each choice with an alternative that computes the same values.

If a choice stopped agreeing with the textbook call it replaced (the exact threshold, the max-abs reduction,
the kept counts, the mask), the figures that justify it would compare different computations.
"""

import json

from benchmarks.speed import code_choices


def test_every_choice_gives_the_values_of_its_alternative(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["code_choices.py", "--repeat", "1", "--out", str(tmp_path)])
    code_choices.main()
    payload = json.loads((tmp_path / "code-choices-cpu.json").read_text())
    rows = payload["rows"]
    assert [row["where"].split()[0] for row in rows] == [
        "engine/threshold.py", "engine/reduce.py", "engine/reduce.py", "engine/pathways.py", "engine/pathways.py",
        "imaging.py"]
    assert all(row["same_values"] for row in rows), [row["where"] for row in rows if not row["same_values"]]
    mask = rows[4]
    assert mask["same_bits"]["bool mul_"] and mask["same_bits"]["uint8 mul_"]
    png = rows[5]
    assert png["bytes"]["heatmap level 1"] > 0 and png["bytes"]["overlay level 6"] > 0
    assert "| engine/threshold.py" in (tmp_path / "code-choices-cpu.md").read_text()
