"""The evaluation's Markdown tables say what was run: a cascade stopped early is not labelled fully randomised."""

from handler.evaluation.tables import randomisation_milestones


def _record(stages: list, cascade_stages: int) -> dict:
    values = {"mean": [0.5] * len(stages)}
    cascade = {"stages": stages, "cascade_stages": cascade_stages, "spearman_abs": values, "spearman": values,
               "ssim": values, "hog": values}
    return {"methods": {"gradient": {"randomisation": cascade}}}


def test_a_cascade_stopped_early_names_its_last_stage_not_full_randomisation():
    header = randomisation_milestones(_record(["fc", "layer4"], 5)).splitlines()[0]
    assert "fully" not in header and "after `layer4` (stage 2 of 5)" in header
    assert "SSIM, after `layer4` (stage 2 of 5)" in header


def test_a_whole_cascade_is_labelled_fully_randomised():
    header = randomisation_milestones(_record(["fc", "layer4", "layer3"], 3)).splitlines()[0]
    assert "... fully randomised" in header and "SSIM, fully" in header
