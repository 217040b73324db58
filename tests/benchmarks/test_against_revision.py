"""benchmarks/speed/against_revision.py: how alternated suite runs of two revisions become one table."""

from __future__ import annotations

import argparse

import pytest

from benchmarks.speed.against_revision import markdown, suite_command, summarise


def _payload(rows):
    return {"results": [
        {"model": model, "batch": batch, "methods": {name: {"median_s": ms / 1e3} for name, ms in methods.items()}}
        for model, batch, methods in rows]}


def test_figures_are_medians_and_ranges_over_runs_per_revision():
    payloads = {
        "earlier": [_payload([("lite0", 1, {"vanilla": 50.0, "pathway": 130.0})]),
                    _payload([("lite0", 1, {"vanilla": 40.0, "pathway": 110.0})]),
                    _payload([("lite0", 1, {"vanilla": 60.0, "pathway": 160.0})])],
        "current": [_payload([("lite0", 1, {"vanilla": 20.0, "pathway": 64.0})])],
    }
    [row] = summarise(payloads)
    earlier, current = row["earlier"], row["current"]
    assert earlier["vanilla_ms"]["median"] == pytest.approx(50.0)
    assert (earlier["vanilla_ms"]["min"], earlier["vanilla_ms"]["max"]) == pytest.approx((40.0, 60.0))
    # each run's ratio and extra cost come from that run's own pair, then the median is taken
    assert earlier["ratio"]["runs"] == pytest.approx([2.6, 2.75, 160 / 60])
    assert earlier["ratio"]["median"] == pytest.approx(160 / 60)
    assert earlier["beyond_two_passes_ms"]["runs"] == pytest.approx([30.0, 30.0, 40.0])
    assert current["ratio"]["median"] == pytest.approx(3.2)
    assert current["beyond_two_passes_ms"]["median"] == pytest.approx(24.0)


def test_rows_without_both_methods_are_left_out_and_models_kept_apart():
    payloads = {
        "earlier": [_payload([("lite0", 8, {"vanilla": 300.0}),
                              ("resnet50", 1, {"vanilla": 100.0, "pathway": 240.0})])],
        "current": [_payload([("lite0", 8, {"vanilla": 200.0, "pathway": 450.0}),
                              ("resnet50", 1, {"vanilla": 90.0, "pathway": 220.0})])],
    }
    rows = {(r["model"], r["batch"]): r for r in summarise(payloads)}
    assert set(rows) == {("lite0", 8), ("resnet50", 1)}
    assert "earlier" not in rows[("lite0", 8)]
    assert rows[("resnet50", 1)]["earlier"]["ratio"]["median"] == pytest.approx(2.4)
    text = markdown(list(rows.values()), {"earlier_revision": "aaaa111", "current_revision": "bbbb222", "runs": 1,
                                          "machine": {"cpu": "test cpu"}, "load": (0.5, 1.0)})
    assert "| lite0 | 8 | aaaa111 | — | — | — | — |" in text
    assert ("| resnet50 | 1 | bbbb222 | 90.0 (90.0–90.0) | 220.0 (220.0–220.0) | 2.44× (2.44–2.44) "
            "| 40.0 (40.0–40.0) |") in text


def test_suite_command_passes_threads_only_when_given_and_as_trained_only_to_this_checkout(tmp_path):
    args = argparse.Namespace(models="lite0", batches="1", threads=None, as_trained=False)
    assert "--threads" not in suite_command("python", tmp_path, "s", args, current=True)
    args.threads = 1
    cmd = suite_command("python", tmp_path, "s", args, current=True)
    assert cmd[cmd.index("--threads") + 1] == "1"
    assert cmd[cmd.index("--methods") + 1] == "vanilla,pathway"
    assert "--as-trained" not in cmd
    args.as_trained = True  # the earlier revision's suite may not know the flag
    assert "--as-trained" in suite_command("python", tmp_path, "s", args, current=True)
    assert "--as-trained" not in suite_command("python", tmp_path, "s", args, current=False)
