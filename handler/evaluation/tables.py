"""Markdown tables of an evaluation record (``pathway-eval``'s ``summary.md`` and the committed report)."""

from __future__ import annotations

from typing import Optional, Sequence


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float) and value != value:
        return "n/a"
    return f"{value:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def lerf_morf_table(record: dict, picks: Sequence[float] = (0.01, 0.05, 0.1)) -> Optional[str]:
    rows = []
    for label, entry in record["methods"].items():
        lm = entry.get("lerf_morf")
        if not lm:
            continue
        index = [lm["fractions"].index(p) for p in picks if p in lm["fractions"]]
        rows.append([f"`{label}`"] + [fmt(lm["lerf"][i]) for i in index] + [fmt(lm["morf"][i]) for i in index])
    if not rows:
        return None
    shown = [p for p in picks if p in next(e["lerf_morf"] for e in record["methods"].values()
                                           if e.get("lerf_morf"))["fractions"]]
    header = ["method"] + [f"LeRF {p:.0%}" for p in shown] + [f"MoRF {p:.0%}" for p in shown]
    return table(header, rows)


def insertion_deletion_table(record: dict) -> Optional[str]:
    rows = [[f"`{label}`", fmt(e["insertion_deletion"]["deletion_auc"]), fmt(e["insertion_deletion"]["insertion_auc"])]
            for label, e in record["methods"].items() if e.get("insertion_deletion")]
    return table(["method", "deletion AUC (lower is better)", "insertion AUC (higher is better)"], rows) if rows else None


def randomisation_table(record: dict, metric: str = "spearman_abs") -> Optional[str]:
    entries = [(label, e["randomisation"]) for label, e in record["methods"].items() if e.get("randomisation")]
    if not entries:
        return None
    stages = entries[0][1]["stages"]
    header = ["method"] + [f"`{s}`" for s in stages]
    rows = [[f"`{label}`"] + [fmt(v, 2) for v in r[metric]["mean"]] for label, r in entries]
    return table(header, rows)


def randomisation_milestones(record: dict) -> Optional[str]:
    """Spearman |·| after the first stage (the classifier), halfway down, and fully randomised; SSIM at the end."""
    entries = [(label, e["randomisation"]) for label, e in record["methods"].items() if e.get("randomisation")]
    if not entries:
        return None
    stages = entries[0][1]["stages"]
    first, mid, last = 0, (len(stages) - 1) // 2, len(stages) - 1
    rows = []
    for label, r in entries:
        sa, s, ss, h = r["spearman_abs"]["mean"], r["spearman"]["mean"], r["ssim"]["mean"], r["hog"]["mean"]
        rows.append([f"`{label}`", fmt(sa[first], 2), fmt(sa[mid], 2), fmt(sa[last], 2), fmt(s[last], 2),
                     fmt(ss[last], 2), fmt(h[last], 2)])
    total = entries[0][1].get("cascade_stages", len(stages))
    last_label = "fully" if len(stages) >= total else f"after `{stages[last]}` (stage {len(stages)} of {total})"
    header = ["method", f"Spearman abs after `{stages[first]}`", f"... after `{stages[mid]}` (mid)",
              "... fully randomised" if len(stages) >= total else f"... {last_label}",
              f"Spearman signed, {last_label}", f"SSIM, {last_label}", f"HOG, {last_label}"]
    return table(header, rows)


def pointing_table(record: dict) -> Optional[str]:
    rows = [[f"`{label}`", fmt(e["pointing_game"]["pointing_accuracy"]), fmt(e["pointing_game"]["energy_in_box"])]
            for label, e in record["methods"].items() if e.get("pointing_game")]
    return table(["method", "pointing accuracy", "energy inside box"], rows) if rows else None


def overlap_table(record: dict) -> Optional[str]:
    overlap = record.get("pathway_overlap")
    if not overlap:
        return None
    rows = [[f"`{s['label']}`", fmt(s["kept_fraction"]),
             f"{s['kept_dead_share']:.1%}", fmt(s["jaccard_with_reference"]), fmt(s["chance_jaccard"]),
             fmt(s["probability"]), fmt(s["pathway_probability"]), fmt(s["seconds_per_image"], 2)]
            for s in overlap["selections"]]
    header = ["selection", "kept share", "kept neurons dead in the full network",
              f"Jaccard with `{overlap['reference']}`", "Jaccard of random sets of that size",
              "p (full network)", "p (pathway)", "s/image"]
    return table(header, rows)


def summary_markdown(record: dict) -> str:
    """Every table the record has data for, with a line on what was evaluated."""
    images = record["images"]
    s = record["settings"]
    parts = [f"# pathway-eval: {record['model']} on {images['count']} images ({images['source']})\n",
             f"Target: {s['target']}; sparsity {s['sparsity']}; reduce {s['reduce']}; seed {s['seed']}.\n"]
    if "command" in record:
        parts.append(f"Command: `{record['command']}`\n")
    for title, text in (("LeRF / MoRF: |p - p'| / p (LeRF lower is better, MoRF higher)", lerf_morf_table(record)),
                        ("Insertion / deletion (RISE)", insertion_deletion_table(record)),
                        ("Cascading randomisation: milestones", randomisation_milestones(record)),
                        ("Cascading randomisation: Spearman abs per stage", randomisation_table(record)),
                        (f"Pointing game (tolerance {fmt(s['tolerance_px'], 1)} px)", pointing_table(record)),
                        ("Pathway overlap", overlap_table(record))):
        if text:
            parts.append(f"## {title}\n\n{text}")
    return "\n".join(parts)
