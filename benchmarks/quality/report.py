"""Regenerate ``benchmarks/quality/REPORT.md``: every method, every protocol, the paper's claims checked with numbers.

    python benchmarks/quality/report.py            # tens of minutes on a 2-core CPU
    python benchmarks/quality/report.py --reuse    # rebuild the report from the last runs' results

Each table comes from one ``pathway-eval`` run whose exact command is written
under it; the runs' raw output (results, maps) goes to ``out/quality/<run>/``,
their ``results.json`` is copied to ``benchmarks/quality/results/<run>.json``
(committed), and the picture grids to ``benchmarks/quality/*.png``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from handler.engine import METHODS, SELECTIONS  # noqa: E402
from handler.evaluation import cli  # noqa: E402
from handler.evaluation.provenance import provenance  # noqa: E402
from handler.evaluation.tables import (fmt, insertion_deletion_table, lerf_morf_table, overlap_table,  # noqa: E402
                                       pointing_table, randomisation_milestones, randomisation_table, table)
from handler.imaging import render_heatmap  # noqa: E402

HERE = ROOT / "benchmarks" / "quality"
RESULTS = HERE / "results"
RAW = ROOT / "out" / "quality"

#: Input-gradient methods the pathway gradient's LeRF goal is compared against (those registered are used).
INPUT_GRADIENT_METHODS = ("gradient", "input_x_gradient", "integrated_gradients", "smoothgrad")
#: Methods the synthetic pointing-game goal compares against.
POINTING_RIVALS = ("gradient", "integrated_gradients", "smoothgrad")
PATHWAY = "pathway_gradient@contribution"
#: The pruning-gate pathway the paper's dead-neuron claim is about: random gate initialisation.
PRUNING_RANDOM = "pruning_gates:init=random"
PRUNING_RANDOM_LONG = "pruning_gates:init=random,iterations=1000"
#: Denser contribution pathways evaluated beside the default 0.7 (the authors used 0.9 on VGG-16).
DENSER = ["pathway_gradient@contribution:sparsity=0.9"]


@dataclass
class Run:
    name: str
    argv: list
    what: str


#: Selections too costly to rerun at every randomisation stage: hundreds of optimisation steps per map, and a
#: forward and backward per activation site and step.
COSTLY_SELECTIONS = ("pruning_gates", "neuron_integrated_gradients")


def randomisation_methods() -> list:
    """Every variant but the pathways of :data:`COSTLY_SELECTIONS` (their cost, at every stage)."""
    out = []
    for name in METHODS.names():
        if METHODS.get(name).uses_pathway:
            out += [f"{name}@{s}" for s in SELECTIONS.names() if s not in COSTLY_SELECTIONS]
        else:
            out.append(name)
    return out


def overlap_selections(long_pruning: bool) -> list:
    """Contribution (the reference), pruning gates (random and all-ones initialisation), then the rest.

    ``long_pruning`` (the small model only; on efficientnet_lite0 each gate step is a forward and a backward
    pass through 6.2 M gated neurons) adds random-init gates trained for the authors' 1000 steps and the
    all-ones initialisation.
    """
    names = SELECTIONS.names()
    chosen = ["contribution"]
    if "pruning_gates" in names:
        chosen += [PRUNING_RANDOM] + ([PRUNING_RANDOM_LONG, "pruning_gates:init=ones"] if long_pruning else [])
    if "random" in names:
        chosen.append("random:seed=1")  # seed 0 would draw the same numbers as the random gate initialisation
    chosen += [n for n in names if n not in ("contribution", "pruning_gates", "random")]
    return chosen


def runs(synthetic: int, synthetic_overlap: int, stages) -> list:
    """The report's runs, cheapest first; each is one ``pathway-eval`` command."""
    common = ["--threads", "2"]
    denser = sum((["--method", m] for m in DENSER + ["pathway_gradient@contribution:sparsity=0.95"]), [])
    return [
        Run("synthetic", ["--model", "synthetic_digits_cnn", "--synthetic", str(synthetic), "--target", "label",
                          "--method", "all", *denser, "--protocol", "pointing_game", "--protocol", "lerf_morf",
                          "--save-maps", *common, "--out", str(RAW / "synthetic")],
            "pointing game, energy in box and LeRF/MoRF, synthetic digits, synthetic_digits_cnn"),
        Run("synthetic_overlap", ["--model", "synthetic_digits_cnn", "--synthetic", str(synthetic_overlap),
                                  "--target", "label", "--protocol", "pathway_overlap",
                                  *sum((["--selection", s] for s in overlap_selections(True)), []), *common,
                                  "--out", str(RAW / "synthetic_overlap")],
            "pathways of each selection strategy, synthetic_digits_cnn"),
        Run("overlap", ["--samples", "--protocol", "pathway_overlap",
                        *sum((["--selection", s] for s in overlap_selections(False)), []), *common,
                        "--out", str(RAW / "overlap")],
            "pathways of each selection strategy, efficientnet_lite0, the five photos"),
        Run("photos", ["--samples", "--method", "all", *sum((["--method", m] for m in DENSER), []),
                       "--protocol", "lerf_morf", "--protocol", "insertion_deletion",
                       "--save-maps", *common, "--out", str(RAW / "photos")],
            "LeRF/MoRF and insertion/deletion, efficientnet_lite0, the five scikit-image photos"),
        Run("randomisation", ["--samples", *sum((["--method", m] for m in randomisation_methods()), []),
                              "--protocol", "randomisation", *(["--stages", str(stages)] if stages else []),
                              *common, "--out", str(RAW / "randomisation")],
            "cascading randomisation, efficientnet_lite0, the five photos"),
    ]


# ---------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------

TILE = 112


def _font():
    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


HEADER = 44


def _wrap(text: str, width: int = 17) -> list:
    """A method label in lines of at most ``width`` characters, broken before '@' and ':' where possible."""
    pieces = text.replace("@", "\n@").replace(":", "\n:").split("\n")
    lines = []
    for piece in pieces:
        while len(piece) > width:
            lines.append(piece[:width])
            piece = piece[width:]
        lines.append(piece)
    return lines


def _label_row(labels, width: int, first: str) -> Image.Image:
    row = Image.new("RGB", (width, HEADER), "white")
    draw = ImageDraw.Draw(row)
    font = _font()
    for i, text in enumerate([first] + list(labels)):
        for j, line in enumerate(_wrap(text)[:3]):
            draw.text((i * TILE + 3, 2 + 13 * j), line, fill="black", font=font)
    return row


def picture_grid(maps_file: Path, out: Path, rows=None, boxes: bool = False) -> None:
    """Rows: images; columns: the image, then each method's |map| (inferno, clipped at the 99.5th percentile)."""
    data = np.load(maps_file)
    methods = data["methods"].tolist()
    index = list(range(len(data["images"]))) if rows is None else list(rows)
    width = TILE * (1 + len(methods))
    grid = Image.new("RGB", (width, HEADER + TILE * len(index)), "white")
    grid.paste(_label_row(methods, width, "image"), (0, 0))
    for r, i in enumerate(index):
        y = HEADER + r * TILE
        photo = Image.fromarray(data["images"][i]).resize((TILE, TILE), Image.BILINEAR)
        scale = TILE / data["images"][i].shape[0]
        if boxes:
            x0, y0, x1, y1 = (v * scale for v in data["boxes"][i])
            ImageDraw.Draw(photo).rectangle([x0, y0, x1 - 1, y1 - 1], outline=(0, 255, 0))
        grid.paste(photo, (0, y))
        for c in range(len(methods)):
            attribution = data[f"map{c}"][i].astype(np.float32)
            heat = render_heatmap(attribution).convert("RGB").resize((TILE, TILE), Image.BILINEAR)
            if boxes:
                draw = ImageDraw.Draw(heat)
                x0, y0, x1, y1 = (v * scale for v in data["boxes"][i])
                draw.rectangle([x0, y0, x1 - 1, y1 - 1], outline=(0, 255, 0))
                peak = np.unravel_index(np.abs(attribution).argmax(), attribution.shape)
                py, px = peak[0] * scale, peak[1] * scale
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], outline=(0, 200, 255), width=2)
            grid.paste(heat, ((c + 1) * TILE, y))
    grid.quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(
        out, optimize=True)


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------


def _present(record, labels) -> list:
    return [label for label in labels if label in record["methods"]]


def _verdict(ok: bool) -> str:
    return "**holds**" if ok else "**does not hold**"


def _per_image(record, label, protocol, key) -> np.ndarray:
    return np.array(record["methods"][label][protocol]["per_image"][key], dtype=float)


def claim_lerf(photos) -> str:
    fr = photos["methods"][PATHWAY]["lerf_morf"]["fractions"]
    pg, g = _per_image(photos, PATHWAY, "lerf_morf", "lerf"), _per_image(photos, "gradient", "lerf_morf", "lerf")
    below = pg.mean(0) < g.mean(0)
    at = lambda a, f: fmt(a.mean(0)[fr.index(f)])  # noqa: E731
    return (
        f"Mean LeRF over the {len(pg)} photos at 1 % / 5 % / 10 %: pathway gradient {at(pg, 0.01)} / "
        f"{at(pg, 0.05)} / {at(pg, 0.1)}, gradient {at(g, 0.01)} / {at(g, 0.05)} / {at(g, 0.1)} "
        f"(authors, ResNet-50 on 2000 ImageNet images, 1 % → 10 %: NeuronMCT .050 → .157, Gradient .324 → .599). "
        f"Pathway gradient is lower at {int(below.sum())} of {len(fr)} fractions"
        + ("" if below.all() else f" (not at {', '.join(f'{f:.0%}' for f, b in zip(fr, below) if not b)})")
        + f"; at 10 % it is lower on {int((pg[:, -1] < g[:, -1]).sum())} of {len(pg)} photos. "
        f"Verdict: {_verdict(bool(below[fr.index(0.1)]) and below.sum() >= len(fr) - 1)}.\n")


def claim_randomisation(randomisation) -> str:
    r = randomisation["methods"][PATHWAY]["randomisation"]
    sa = r["spearman_abs"]["mean"]
    mid = (len(sa) - 1) // 2
    others = []
    for label in ("gradient", "grad_cam", "guided_backprop"):
        o = randomisation["methods"].get(label, {}).get("randomisation")
        if o:
            v = o["spearman_abs"]["mean"]
            others.append(f"{label} {fmt(v[0], 2)} / {fmt(v[mid], 2)} / {fmt(v[-1], 2)}")
    ok = sa[-1] is not None and sa[0] is not None and sa[-1] <= 0.2 and sa[-1] < sa[0]
    return (
        f"Spearman rank correlation of |map| with the original map after `{r['stages'][0]}` / after "
        f"`{r['stages'][mid]}` (mid-network) / fully randomised: pathway gradient {fmt(sa[0], 2)} / "
        f"{fmt(sa[mid], 2)} / {fmt(sa[-1], 2)}" + ("; " + "; ".join(others) if others else "")
        + " (authors, ResNet-50 on 1000 images: NeuronMCT .50 / .35 / .12, Gradient .49 / .36 / .04, Grad-CAM "
        ".71 / .51 / .42, guided backprop .99 / .96 / .15). Criterion: fully randomised |Spearman| ≤ 0.2 and "
        f"below the value after the first stage. Verdict: {_verdict(ok)}.\n")


def claim_dead_neurons(overlap, where: str) -> str:
    """The dead-neuron numbers, then three checks: contribution keeps none; random-init pruning keeps many; and
    whether the pruning pathway does what the paper says it does besides (keep the response, differ from chance)."""
    sel = {s["label"]: s for s in overlap["pathway_overlap"]["selections"]}
    contribution = sel["contribution"]
    o = overlap["pathway_overlap"]
    text = (f"**{where}**, sparsity {o['sparsity']}: {o['dead_share_of_network']:.1%} of all neurons are dead at "
            f"these inputs. Contribution pathways keep {contribution['kept_dead_share']:.1%} dead neurons "
            f"(authors: 0 %) and p = {fmt(contribution['pathway_probability'])} of the explained class along them "
            f"(full network: {fmt(contribution['probability'])}).")
    pruning = [sel[label] for label in (PRUNING_RANDOM, PRUNING_RANDOM_LONG, "pruning_gates:init=ones") if label in sel]
    if not pruning:
        return text + " `pruning_gates` is not registered, so the comparison is not measured.\n"
    for s in pruning:
        text += (f" `{s['label']}`: keeps {s['kept_fraction']:.1%} of the neurons, {s['kept_dead_share']:.1%} of "
                 f"them dead, Jaccard with the contribution pathway {fmt(s['jaccard_with_reference'])} (random "
                 f"sets of these sizes: {fmt(s['chance_jaccard'])}), p = {fmt(s['pathway_probability'])} along it.")
    random = next((s for label, s in sel.items() if label.startswith("random")), None)
    if random:
        text += f" A random pathway (`{random['label']}`) keeps {random['kept_dead_share']:.1%} dead."
    main = sel.get(PRUNING_RANDOM_LONG) or sel[PRUNING_RANDOM]
    many_dead = main["kept_dead_share"] >= 0.2
    keeps_response = main["pathway_probability"] >= 0.8 * main["probability"]
    text += (f" Authors: 67 % dead with random gate initialisation, Jaccard 0.02-0.30, and the pruning pathway "
             f"keeps the response.\n\nChecks on `{main['label']}`: contribution pathways keep no dead neuron "
             f"— {_verdict(contribution['kept_dead_share'] == 0)}; the random-init pruning pathway keeps at least "
             f"20 % dead neurons — {_verdict(many_dead)} ({main['kept_dead_share']:.1%}); it keeps the response "
             f"(pathway p ≥ 0.8 × full p) — {_verdict(keeps_response)} ({fmt(main['pathway_probability'])} vs "
             f"{fmt(main['probability'])}).\n")
    return text


def goals_table(photos, synthetic) -> str:
    rows = []
    if photos:
        pg10 = float(_per_image(photos, PATHWAY, "lerf_morf", "lerf")[:, -1].mean())
        rows.append(["pathway gradient mean LeRF at 10 % on the photos ≤ 0.15 (naive reference: 0.107)", fmt(pg10),
                     "met" if pg10 <= 0.15 else "not met"])
        rivals = [(label, float(_per_image(photos, label, "lerf_morf", "lerf")[:, -1].mean()))
                  for label in _present(photos, INPUT_GRADIENT_METHODS)]
        worse = [f"{label} {fmt(v)}" for label, v in rivals if v <= pg10]
        rows.append(["... and lower than every input-gradient method",
                     ", ".join(f"{label} {fmt(v)}" for label, v in rivals),
                     "met" if not worse else "not met: " + ", ".join(worse) + " lower"])
        d_pg = photos["methods"][PATHWAY]["insertion_deletion"]["deletion_auc"]
        d_g = photos["methods"]["gradient"]["insertion_deletion"]["deletion_auc"]
        rows.append(["pathway gradient deletion AUC on the photos lower than gradient's",
                     f"{fmt(d_pg)} vs {fmt(d_g)}", "met" if d_pg < d_g else "not met"])
    if synthetic:
        acc = synthetic["methods"][PATHWAY]["pointing_game"]["pointing_accuracy"]
        rivals = [(label, synthetic["methods"][label]["pointing_game"]["pointing_accuracy"])
                  for label in _present(synthetic, POINTING_RIVALS)]
        missing = [label for label in POINTING_RIVALS if label not in synthetic["methods"]]
        behind = [f"{label} {fmt(v)}" for label, v in rivals if v > acc]
        count = synthetic["images"]["count"]
        gap = max((v for _, v in rivals), default=acc) - acc
        denser = [(label, synthetic["methods"][label]["pointing_game"]["pointing_accuracy"])
                  for label in synthetic["methods"] if label.startswith(PATHWAY + ":sparsity=")]
        rows.append(["synthetic pointing game of pathway gradient ≥ gradient, IG and SmoothGrad",
                     f"{fmt(acc)} vs " + ", ".join(f"{label} {fmt(v)}" for label, v in rivals)
                     + "".join(f"; {label.split(':')[-1].replace('=', ' ')}: {fmt(v)}" for label, v in denser),
                     ("met" if not behind else "not met: " + ", ".join(behind) + " higher"
                      + f" (by {round(gap * count)} of {count} images)")
                     + (f"; not registered: {', '.join(missing)}" if missing else "")])
    return table(["goal", "measured", "status"], rows)


def _synthetic_sparsity_note(synthetic) -> str:
    entry = synthetic["methods"].get(PATHWAY)
    if not entry or "realised_sparsity" not in entry:
        return ""
    same = (entry["pointing_game"]["per_image"]["hit"]
            == synthetic["methods"]["gradient"]["pointing_game"]["per_image"]["hit"]
            and entry["pointing_game"]["energy_in_box"] == synthetic["methods"]["gradient"]["pointing_game"]["energy_in_box"])
    return (f"On this network the contribution pathway at the default sparsity 0.7 realises "
            f"{entry['realised_sparsity']:.3f}: more than 70 % of its neurons contribute exactly nothing (dead, or "
            f"with a zero gradient, e.g. not selected by a max-pool), so the 0.7-quantile threshold is 0 and only those neurons are removed"
            + (" — the pathway gradient is then the vanilla gradient, and its rows equal the gradient's. "
               if same else ". ")
            + "The rows at sparsity 0.9 and 0.95 show the pathway proper.\n")


def compact(record: dict) -> dict:
    """The record for committing: floats to 5 decimals; per-image LeRF/MoRF curves dropped above 50 images
    (the means stay; the full record is in ``out/quality/<run>/results.json``)."""
    def walk(value):
        if isinstance(value, float):
            return round(value, 5)
        if isinstance(value, dict):
            return {k: walk(v) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    out = walk(record)
    if out["images"]["count"] > 50:
        for entry in out["methods"].values():
            if "lerf_morf" in entry:
                entry["lerf_morf"]["per_image"] = "omitted: more than 50 images (see out/quality/)"
    return out


def write_report(records: dict, commands: dict, seconds: dict, started: str) -> str:
    photos, randomisation = records.get("photos"), records.get("randomisation")
    overlap, synthetic = records.get("overlap"), records.get("synthetic")
    synthetic_overlap = records.get("synthetic_overlap")
    prov = provenance()
    methods = list((photos or synthetic or {"methods": {}})["methods"])
    expected = ["input_x_gradient", "integrated_gradients", "smoothgrad", "grad_cam", "guided_backprop"]
    missing = ([m for m in expected if m not in METHODS]
               + [s for s in ("resampling_correlation", "resampling_precision", "pruning_gates", "random")
                  if s not in SELECTIONS])
    revisions = sorted({r["provenance"]["revision"] + ("+changes" if r["provenance"]["dirty"] else "")
                        for r in records.values()})
    rendered = prov["revision"] + ("+changes" if prov["dirty"] else "")
    parts = [
        "# Explanation quality: pathway gradient against the baselines\n",
        "Everything below (tables, verdicts, pictures, `results/*.json`) is regenerated by one command, tens of "
        "minutes on an idle 2-core CPU:\n",
        "```sh\npython benchmarks/quality/report.py      # or: make quality\n```\n",
        f"Report written {started} on {prov['cpu']} ({prov['cpu_count']} cores, {prov['torch_threads']} torch "
        f"threads, {'GPU ' + prov['gpu'] if prov['gpu'] else 'no GPU'}), Python {prov['python']}, torch "
        f"{prov['torch']}, {prov['platform']}. Runs made at revision {', '.join(f'`{r}`' for r in revisions)}; "
        f"report rendered at `{rendered}` (`+changes`: with uncommitted changes to tracked files). The machine "
        "was shared with other jobs (load 2-8 on its 2 cores), so the run times below are not benchmarks.\n",
        f"Methods evaluated ({len(methods)}): " + ", ".join(f"`{m}`" for m in methods) + ". "
        + (f"Not registered on this branch, so not evaluated: {', '.join(f'`{m}`' for m in missing)}. "
           if missing else "")
        + "`pathway_gradient@SELECTION` is the pathway gradient along a pathway chosen by that selection "
        "strategy; `pathway_gradient@contribution` is the paper's method (NeuronMCT). Every method runs with its "
        "registered defaults (integrated gradients: 50 steps from a black baseline, Gauss-Legendre; SmoothGrad: "
        "50 samples, noise 0.15 of the input range; Grad-CAM: last [C, H, W] activation; pruning gates: 100 "
        "SGD steps, all-ones initialisation; input resampling: 50 copies), sparsity 0.7, channel reduction "
        "`max_abs`, pixels ranked by |map|.\n",
        "## Does the paper's story hold here?\n",
    ]
    if photos:
        parts += ["### Claim 1: pathway gradient's LeRF is below the vanilla gradient's\n", claim_lerf(photos)]
    if randomisation and PATHWAY in randomisation["methods"]:
        parts += ["### Claim 2: pathway gradient's maps degrade under cascading randomisation\n",
                  claim_randomisation(randomisation)]
    if overlap or synthetic_overlap:
        parts.append("### Claim 3: pruning-gate pathways keep originally dead neurons, contribution pathways none\n")
        if overlap:
            parts.append(claim_dead_neurons(overlap, "efficientnet_lite0 on the five photos"))
        if synthetic_overlap:
            parts.append(claim_dead_neurons(
                synthetic_overlap, f"synthetic_digits_cnn on {synthetic_overlap['images']['count']} synthetic images"))
    parts += ["### Goals\n", goals_table(photos, synthetic)]
    if photos:
        parts += [
            "## Sample photos, efficientnet_lite0\n",
            "The five colour photos shipped with scikit-image (coffee, chelsea, astronaut, rocket, motorcycle_left), "
            "each explained for its predicted class. Five images: differences of a few hundredths are noise; the "
            "per-image values are in `results/photos.json`.\n",
            "![maps: rows are photos, columns methods; |map|, inferno, clipped at the 99.5th percentile]"
            "(photos_grid.png)\n",
            "### LeRF / MoRF: |p − p′| / p of the explained class (LeRF lower is better, MoRF higher)\n",
            "Pixels set to 0 in normalised space (the mean colour); ties in a map broken in a seeded random order.\n",
            lerf_morf_table(photos),
            "### Insertion / deletion (RISE: 224 pixels per step, insertion from an 11×11 σ = 5 blur)\n",
            "Authors' reference (RISE on 10 000 ImageNet images, ResNet-50): deletion 0.105, insertion 0.772.\n",
            insertion_deletion_table(photos), f"Command: `{commands['photos']}`\n",
        ]
    if randomisation:
        parts += [
            "### Cascading randomisation (Adebayo et al. 2018)\n",
            "Units re-initialised cumulatively from the logits down (`reset_parameters`, seeded); each map is "
            "recomputed for the originally explained class and compared with the original map. A method that "
            "passes the sanity check drops towards 0. Spearman is undefined for a constant map; such values are "
            "left out of the means, and `n/a` means every map of that stage was constant (all zero: the "
            "randomised network's pathway no longer reaches the target). The pruning-gate pathway is not in "
            "this run (100 optimisation steps per map at each of 10 stages).\n",
            randomisation_milestones(randomisation),
            "Spearman |·| per stage:\n", randomisation_table(randomisation),
            f"Command: `{commands['randomisation']}`\n",
        ]
    for record, name, where in ((overlap, "overlap", "efficientnet_lite0, the five photos"),
                                (synthetic_overlap, "synthetic_overlap", "synthetic_digits_cnn, synthetic images")):
        if record:
            parts += [
                f"### Pathways by selection strategy: {where}\n",
                "A neuron is *dead* when its activation is exactly 0 in the full network at that input. Jaccard is "
                "|A ∩ B| / |A ∪ B| of the kept-neuron sets, against the contribution pathway; the chance column is "
                "what two random sets of the same sizes would give. p is the explained class's probability.\n",
                overlap_table(record), f"Command: `{commands[name]}`\n",
            ]
    if synthetic:
        train = json.loads((RESULTS / "synthetic_training.json").read_text())
        s = synthetic["settings"]
        boxes = synthetic["images"]["boxes"]
        box_share = np.mean([(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]) / 112 ** 2
        parts += [
            "## Synthetic localisation set, synthetic_digits_cnn\n",
            f"{synthetic['images']['count']} test images (112×112): scikit-learn's handwritten digits (500 digits "
            f"never used in training), upscaled to 32-56 px and placed at random on scikit-image textures (brick, "
            f"grass, gravel, moon, Hubble deep field, immunohistochemistry), with the digit's tight box as ground "
            f"truth. The model ({train['parameters']:,} parameters, five ReLU convolutions, trained by "
            f"`benchmarks/quality/train_synthetic.py`: {train['test_accuracy']:.1%} on 1000 held-out images) "
            f"reads {synthetic['images']['accuracy']:.1%} of these correctly; every map explains the true digit. "
            f"The box covers {box_share:.1%} of the image on average: a map pointing at random would hit about "
            f"that often, somewhat more with the tolerance.\n",
            _synthetic_sparsity_note(synthetic),
            "![synthetic maps: green box = ground truth, cyan circle = the map's maximum](synthetic_grid.png)\n",
            f"### Pointing game (hit: the map's maximum within {fmt(s['tolerance_px'], 1)} px of the box, "
            f"Zhang et al.'s 15 px at 224 px scaled to 112) and energy inside the box\n",
            pointing_table(synthetic),
            "### LeRF / MoRF\n", lerf_morf_table(synthetic), f"Command: `{commands['synthetic']}`\n",
        ]
    parts += [
        "## Run times\n",
        table(["run", "minutes", "revision"],
              [[name, f"{seconds[name] / 60:.1f}", records[name]["provenance"]["revision"]] for name in records]),
        "Seconds per image of each method are in `results/*.json` (`seconds_per_image`).\n",
        "## Notes and caveats\n",
        "- Means over images; `results/*.json` hold every per-image value, the settings and the machine. "
        "`pathway-eval` is the console script; `python -m handler.evaluation.cli` runs the same without installing.\n"
        "- Five photos make photo-level conclusions indicative only; the synthetic set has ground truth and "
        "hundreds of images, but a small network and an easy task: the pointing game saturates (every "
        "gradient-based method hits on at least 98 % of the images), so energy inside the box is the measure "
        "that separates methods there. The committed `results/synthetic.json` leaves out the per-image "
        "LeRF/MoRF curves (500 images); `out/quality/synthetic/results.json` has them.\n"
        "- Pruning gates follow the pruning objective of docs/methods.md (loss: cross-entropy to the original softmax + 0.01 Σ|g| over all "
        "neurons, SGD lr 0.01, momentum 0.9). From a random initialisation, 100 steps leave the gates close to "
        "their random start (the pathway overlaps the contribution pathway exactly as much as a random set "
        "does); after 1000 steps the L1 term has driven almost every gate to 0, so the realised sparsity is far "
        "above 0.7. Neither keeps the response; the all-ones initialisation does.\n"
        "- LeRF/MoRF divide by the unperturbed probability p, so a photo with small p weighs as much as one with "
        "p close to 1.\n"
        "- Cascading randomisation re-initialises with PyTorch's default initialisers (BatchNorm: unit scale, "
        "zero shift, fresh running statistics); the authors re-initialised ResNet-50 with its own initialisers.\n",
    ]
    return "\n".join(p if p.endswith("\n") else p + "\n" for p in parts if p)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reuse", action="store_true", help="reuse out/quality/*/results.json where present")
    p.add_argument("--only", action="append", default=[], metavar="RUN",
                   help="make only this run (repeatable); the others are reused where present")
    p.add_argument("--synthetic", type=int, default=500, help="synthetic test images (default 500)")
    p.add_argument("--synthetic-overlap", type=int, default=100,
                   help="synthetic images in the pathway-overlap run (default 100)")
    p.add_argument("--stages", type=int, default=None, help="randomisation stages (default: all)")
    args = p.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    records, commands, seconds = {}, {}, {}
    RESULTS.mkdir(parents=True, exist_ok=True)
    for run in runs(args.synthetic, args.synthetic_overlap, args.stages):
        result_file = RAW / run.name / "results.json"
        skip = (args.reuse or (args.only and run.name not in args.only)) and result_file.exists()
        if args.only and run.name not in args.only and not result_file.exists():
            continue
        if not skip:
            print(f"== {run.name}: {run.what}", file=sys.stderr, flush=True)
            begin = time.perf_counter()
            code = cli.run(run.argv)
            if code != 0:
                print(f"report: run {run.name} failed with exit status {code}", file=sys.stderr)
                return code
            record = json.loads(result_file.read_text())
            record["elapsed_s"] = time.perf_counter() - begin
            result_file.write_text(json.dumps(record, indent=1) + "\n")
        record = json.loads(result_file.read_text())
        records[run.name] = record
        seconds[run.name] = record.get("elapsed_s", float("nan"))
        commands[run.name] = record["command"].replace(str(ROOT) + "/", "")
        (RESULTS / f"{run.name}.json").write_text(json.dumps(compact(record), separators=(",", ":")) + "\n")
    if "photos" in records:
        picture_grid(RAW / "photos" / "maps.npz", HERE / "photos_grid.png")
    if "synthetic" in records:
        picture_grid(RAW / "synthetic" / "maps.npz", HERE / "synthetic_grid.png", rows=range(6), boxes=True)
    (HERE / "REPORT.md").write_text(write_report(records, commands, seconds, started))
    print(f"wrote {HERE / 'REPORT.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
