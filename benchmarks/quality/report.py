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
import shutil
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
#: Selection options for the pruning-gate pathways in the overlap run: random gate initialisation, as in the paper.
PRUNING_OPTIONS = {"init": "random"}


@dataclass
class Run:
    name: str
    argv: list
    what: str


def randomisation_methods() -> list:
    """Every variant but the pruning-gate pathway (hundreds of optimisation steps per map, at every stage)."""
    out = []
    for name in METHODS.names():
        if METHODS.get(name).uses_pathway:
            out += [f"{name}@{s}" for s in SELECTIONS.names() if s != "pruning_gates"]
        else:
            out.append(name)
    return out


def overlap_selections() -> list:
    names = SELECTIONS.names()
    chosen = ["contribution"]
    if "pruning_gates" in names:
        strategy = SELECTIONS.get("pruning_gates")
        opts = {k: v for k, v in PRUNING_OPTIONS.items() if k in strategy.options}
        chosen.append("pruning_gates" + (":" + ",".join(f"{k}={v}" for k, v in opts.items()) if opts else ""))
    chosen += [n for n in names if n not in ("contribution", "pruning_gates")]
    return chosen


def runs(synthetic: int, stages) -> list:
    common = ["--threads", "2"]
    out = [
        Run("photos", ["--samples", "--method", "all", "--protocol", "lerf_morf", "--protocol", "insertion_deletion",
                       "--save-maps", *common, "--out", str(RAW / "photos")],
            "LeRF/MoRF and insertion/deletion, efficientnet_lite0, the five scikit-image photos"),
        Run("randomisation", ["--samples", *sum((["--method", m] for m in randomisation_methods()), []),
                              "--protocol", "randomisation", *(["--stages", str(stages)] if stages else []),
                              *common, "--out", str(RAW / "randomisation")],
            "cascading randomisation, efficientnet_lite0, the five photos"),
        Run("overlap", ["--samples", "--protocol", "pathway_overlap",
                        *sum((["--selection", s] for s in overlap_selections()), []), *common,
                        "--out", str(RAW / "overlap")],
            "pathways of each selection strategy, efficientnet_lite0, the five photos"),
        Run("synthetic", ["--model", "synthetic_digits_cnn", "--synthetic", str(synthetic), "--target", "label",
                          "--method", "all", "--protocol", "pointing_game", "--protocol", "lerf_morf",
                          "--save-maps", *common, "--out", str(RAW / "synthetic")],
            "pointing game, energy in box and LeRF/MoRF, synthetic digits, synthetic_digits_cnn"),
    ]
    return out


# ---------------------------------------------------------------------------
# Pictures
# ---------------------------------------------------------------------------

TILE = 112


def _font():
    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _label_row(labels, width: int, first: str) -> Image.Image:
    row = Image.new("RGB", (width, 30), "white")
    draw = ImageDraw.Draw(row)
    font = _font()
    for i, text in enumerate([first] + list(labels)):
        lines = text.replace("@", "\n@").split("\n")
        for j, line in enumerate(lines[:2]):
            draw.text((i * TILE + 3, 2 + 13 * j), line[:18], fill="black", font=font)
    return row


def picture_grid(maps_file: Path, out: Path, rows=None, boxes: bool = False) -> None:
    """Rows: images; columns: the image, then each method's |map| (inferno, clipped at the 99.5th percentile)."""
    data = np.load(maps_file)
    methods = data["methods"].tolist()
    index = list(range(len(data["images"]))) if rows is None else list(rows)
    width = TILE * (1 + len(methods))
    grid = Image.new("RGB", (width, 30 + TILE * len(index)), "white")
    grid.paste(_label_row(methods, width, "image"), (0, 0))
    for r, i in enumerate(index):
        y = 30 + r * TILE
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


def _m(record, label):
    return record["methods"].get(label)


def _present(record, labels):
    return [l for l in labels if l in record["methods"]]


def _verdict(ok) -> str:
    return "**holds**" if ok else "**does not hold**"


def claims_and_goals(photos, randomisation, overlap, synthetic) -> str:
    lines = []
    # 1. LeRF
    lines.append("### Claim 1: pathway gradient's LeRF is below the vanilla gradient's\n")
    fr = photos["methods"][PATHWAY]["lerf_morf"]["fractions"]
    pg = np.array(photos["methods"][PATHWAY]["lerf_morf"]["per_image"]["lerf"])
    g = np.array(photos["methods"]["gradient"]["lerf_morf"]["per_image"]["lerf"])
    below = pg.mean(0) < g.mean(0)
    wins = (pg[:, -1] < g[:, -1]).sum()
    lines.append(
        f"Mean LeRF over the {len(pg)} photos, pathway gradient vs gradient, at 1 % / 5 % / 10 %: "
        f"{fmt(pg.mean(0)[0])} / {fmt(pg.mean(0)[4])} / {fmt(pg.mean(0)[-1])} vs "
        f"{fmt(g.mean(0)[0])} / {fmt(g.mean(0)[4])} / {fmt(g.mean(0)[-1])} "
        f"(authors, ResNet-50 on ImageNet, 1 % → 10 %: NeuronMCT .050 → .157, Gradient .324 → .599). "
        f"Lower at {int(below.sum())} of {len(fr)} fractions; at 10 % lower on {wins} of {len(pg)} photos. "
        f"Verdict: {_verdict(bool(below[-1]) and below.sum() >= len(fr) - 1)}"
        + ("" if below.all() else f" (not at {', '.join(f'{f:.0%}' for f, b in zip(fr, below) if not b)})") + ".\n")
    # 2. Randomisation
    lines.append("### Claim 2: pathway gradient's maps degrade under cascading randomisation\n")
    if randomisation and PATHWAY in randomisation["methods"]:
        r = randomisation["methods"][PATHWAY]["randomisation"]
        sa = r["spearman_abs"]["mean"]
        mid = (len(sa) - 1) // 2
        gr = randomisation["methods"].get("gradient", {}).get("randomisation")
        gtext = (f"; gradient: {fmt(gr['spearman_abs']['mean'][0], 2)} / {fmt(gr['spearman_abs']['mean'][mid], 2)} / "
                 f"{fmt(gr['spearman_abs']['mean'][-1], 2)}") if gr else ""
        ok = sa[-1] is not None and sa[-1] <= 0.2 and sa[-1] < sa[0]
        lines.append(
            f"Spearman rank correlation of |map| with the original, after `{r['stages'][0]}` / "
            f"after `{r['stages'][mid]}` (mid-network) / fully randomised: pathway gradient "
            f"{fmt(sa[0], 2)} / {fmt(sa[mid], 2)} / {fmt(sa[-1], 2)}{gtext} "
            f"(authors, ResNet-50: NeuronMCT .50 / .35 / .12, Gradient .49 / .36 / .04). "
            f"Criterion: fully randomised |Spearman| ≤ 0.2 and below the first stage's. "
            f"Verdict: {_verdict(ok)}.\n")
    else:
        lines.append("Not measured.\n")
    # 3. Pathway overlap
    lines.append("### Claim 3: pruning-gate pathways keep dead neurons, contribution pathways keep none\n")
    sel = {s["selection"]: s for s in overlap["pathway_overlap"]["selections"]}
    contribution = sel.get("contribution")
    pruning = sel.get("pruning_gates")
    text = (f"Contribution pathways at sparsity {overlap['pathway_overlap']['sparsity']}: "
            f"{contribution['kept_dead_share']:.1%} of the kept neurons are dead in the full network "
            f"(authors: 0 %); {overlap['pathway_overlap']['dead_share_of_network']:.1%} of all neurons are dead. ")
    if pruning:
        ok = pruning["kept_dead_share"] > 0.2 and contribution["kept_dead_share"] == 0
        text += (f"Pruning-gate pathways{' ' + str(pruning['options']) if pruning['options'] else ''}: "
                 f"{pruning['kept_dead_share']:.1%} dead (authors: 67 %), Jaccard overlap with the contribution "
                 f"pathway {fmt(pruning['jaccard_with_reference'])} (authors: 0.02-0.30; two random sets of these "
                 f"sizes: {fmt(pruning['chance_jaccard'])}); the response they keep: p = "
                 f"{fmt(pruning['pathway_probability'])} along the pathway vs {fmt(pruning['probability'])} in the "
                 f"full network. Verdict: {_verdict(ok)}.\n")
    else:
        text += "The `pruning_gates` selection is not registered on this branch: the comparison is not measured.\n"
    lines.append(text)
    # Goals
    lines.append("### Goals\n")
    rows = []
    pg10 = float(pg[:, -1].mean())
    rows.append(["pathway gradient mean LeRF at 10 % on the photos ≤ 0.15", fmt(pg10),
                 "met" if pg10 <= 0.15 else "not met"])
    rivals = [(l, float(np.mean(np.array(photos["methods"][l]["lerf_morf"]["per_image"]["lerf"])[:, -1])))
              for l in _present(photos, INPUT_GRADIENT_METHODS)]
    worse = [f"{l} {fmt(v)}" for l, v in rivals if v <= pg10]
    rows.append(["... and lower than every input-gradient method (" + ", ".join(l for l, _ in rivals) + ")",
                 ", ".join(f"{l} {fmt(v)}" for l, v in rivals),
                 "met" if not worse else "not met (" + ", ".join(worse) + ")"])
    d_pg = photos["methods"][PATHWAY]["insertion_deletion"]["deletion_auc"]
    d_g = photos["methods"]["gradient"]["insertion_deletion"]["deletion_auc"]
    rows.append(["pathway gradient deletion AUC lower than gradient's", f"{fmt(d_pg)} vs {fmt(d_g)}",
                 "met" if d_pg < d_g else "not met"])
    if synthetic:
        acc = synthetic["methods"][PATHWAY]["pointing_game"]["pointing_accuracy"]
        rivals = [(l, synthetic["methods"][l]["pointing_game"]["pointing_accuracy"])
                  for l in _present(synthetic, POINTING_RIVALS)]
        missing = [l for l in POINTING_RIVALS if l not in synthetic["methods"]]
        behind = [f"{l} {fmt(v)}" for l, v in rivals if v > acc]
        rows.append(["synthetic pointing game ≥ gradient, IG and SmoothGrad",
                     f"{fmt(acc)} vs " + ", ".join(f"{l} {fmt(v)}" for l, v in rivals),
                     ("met" if not behind else "not met (" + ", ".join(behind) + ")")
                     + (f"; not registered: {', '.join(missing)}" if missing else "")])
    lines.append(table(["goal", "measured", "status"], rows))
    return "\n".join(lines)


def write_report(records: dict, commands: dict, seconds: dict, started: str, elapsed: float) -> str:
    photos, randomisation = records["photos"], records.get("randomisation")
    overlap, synthetic = records["overlap"], records.get("synthetic")
    prov = provenance()
    methods = list(photos["methods"])
    expected = ["input_x_gradient", "integrated_gradients", "smoothgrad", "grad_cam", "guided_backprop"]
    missing_methods = [m for m in expected if m not in METHODS]
    missing_sel = [s for s in ("resampling_correlation", "resampling_precision", "pruning_gates", "random")
                   if s not in SELECTIONS]
    parts = [
        "# Explanation quality: pathway gradient against the baselines\n",
        "Regenerate everything below with one command (tens of minutes on a 2-core CPU):\n",
        "```sh\npython benchmarks/quality/report.py\n```\n",
        f"Generated {started} in {elapsed / 60:.0f} min on: {prov['cpu']} ({prov['cpu_count']} cores, "
        f"{prov['torch_threads']} torch threads{', GPU ' + prov['gpu'] if prov['gpu'] else ', no GPU'}), "
        f"Python {prov['python']}, torch {prov['torch']}, {prov['platform']}; revision `{prov['revision']}`"
        + (" plus uncommitted changes" if prov["dirty"] else "") + ".\n",
        f"Methods evaluated ({len(methods)}): " + ", ".join(f"`{m}`" for m in methods) + ". "
        + (f"Not registered on this branch, so not evaluated: {', '.join(f'`{m}`' for m in missing_methods + missing_sel)}. "
           if missing_methods or missing_sel else "")
        + "`METHOD@SELECTION` is the pathway gradient along a pathway chosen by that selection strategy; "
        "`pathway_gradient@contribution` is the paper's method (NeuronMCT). Sparsity 0.7, channel reduction "
        "`max_abs`, pixels ranked by |map|.\n",
        "## Does the paper's story hold here?\n",
        claims_and_goals(photos, randomisation, overlap, synthetic),
        "## Sample photos, efficientnet_lite0\n",
        f"The five colour photos shipped with scikit-image (coffee, chelsea, astronaut, rocket, motorcycle_left), "
        f"each explained for its predicted class. Five images: differences of a few hundredths are noise; the "
        f"per-image values are in `results/photos.json`.\n",
        "![maps](photos_grid.png)\n",
        "### LeRF / MoRF: |p − p′| / p of the explained class (LeRF lower is better, MoRF higher)\n",
        "Pixels set to 0 in normalised space (the mean colour); ties in a map broken in a seeded random order.\n",
        lerf_morf_table(photos), f"`{commands['photos']}`\n",
        "### Insertion / deletion (RISE: 224 pixels per step, insertion from an 11×11 σ=5 blur)\n",
        insertion_deletion_table(photos), f"`{commands['photos']}`\n",
    ]
    if randomisation:
        parts += [
            "### Cascading randomisation (Adebayo et al.)\n",
            "Units re-initialised cumulatively from the logits down (`reset_parameters`, seeded); each map is "
            "recomputed for the originally explained class and compared with the original map. A method that "
            "passes the sanity check drops towards 0.\n",
            randomisation_milestones(randomisation),
            "Spearman |·| per stage:\n", randomisation_table(randomisation),
            f"`{commands['randomisation']}`\n",
        ]
    parts += [
        "### Pathways by selection strategy (dead neurons, overlap)\n",
        "A neuron is *dead* when its activation is exactly 0 in the full network at that input. Jaccard is "
        "|A ∩ B| / |A ∪ B| of the kept-neuron sets, against the contribution pathway; the chance column is what "
        "two random sets of the same sizes would give.\n",
        overlap_table(overlap), f"`{commands['overlap']}`\n",
    ]
    if synthetic:
        train = json.loads((RESULTS / "synthetic_training.json").read_text())
        s = synthetic["settings"]
        parts += [
            "## Synthetic localisation set, synthetic_digits_cnn\n",
            f"{synthetic['images']['count']} test images (112×112): scikit-learn's handwritten digits (held-out "
            f"digits), upscaled to 32-56 px and placed at random on scikit-image textures (brick, grass, gravel, "
            f"moon, Hubble deep field, immunohistochemistry), with the digit's tight box as ground truth. The "
            f"model ({train['parameters']:,} parameters, ReLU, trained by `benchmarks/quality/train_synthetic.py` "
            f"in {train['train_seconds'] / 60:.0f} min) reads {synthetic['images']['accuracy']:.1%} of them "
            f"correctly; every map explains the true digit. The box covers "
            f"{fmt(np.mean([(b[2] - b[0]) * (b[3] - b[1]) for b in synthetic['images']['boxes']]) / 112 ** 2)} "
            f"of the image on average: a map that points at random hits about that often (more with the "
            f"tolerance).\n",
            "![synthetic maps](synthetic_grid.png)\n",
            f"### Pointing game (hit: the map's maximum within {fmt(s['tolerance_px'], 1)} px of the box, "
            f"Zhang et al.'s 15 px at 224 scaled to 112) and energy inside the box\n",
            pointing_table(synthetic),
            "### LeRF / MoRF\n", lerf_morf_table(synthetic), f"`{commands['synthetic']}`\n",
        ]
    parts += [
        "## Run times\n",
        table(["run", "minutes"], [[name, f"{s / 60:.1f}"] for name, s in seconds.items()]),
        "Per-method seconds per image are in each `results/*.json` (`seconds_per_image`).\n",
        "## Notes and caveats\n",
        "- Numbers are means over images; `results/*.json` hold every per-image value, the settings and the "
        "machine. `pathway-eval` is the console script (`python -m handler.evaluation.cli` runs the same without "
        "installing).\n"
        "- The photos are five, so photo-level conclusions are indicative; the synthetic set has ground truth "
        "and hundreds of images.\n"
        "- LeRF/MoRF divide by the unperturbed probability p; a photo with small p (rocket, astronaut) weighs "
        "as much as one with p close to 1.\n"
        "- Cascading randomisation re-initialises with PyTorch's default initialisers (BatchNorm: unit scale, "
        "zero shift, fresh running statistics); the authors re-initialised ResNet-50 with its own initialisers.\n",
    ]
    return "\n".join(p if p.endswith("\n") else p + "\n" for p in parts if p)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reuse", action="store_true", help="reuse out/quality/*/results.json where present")
    p.add_argument("--synthetic", type=int, default=500, help="synthetic test images (default 500)")
    p.add_argument("--stages", type=int, default=None, help="randomisation stages (default: all)")
    p.add_argument("--only", action="append", default=[], help="run only these runs (the others are reused)")
    args = p.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    t0 = time.perf_counter()
    records, commands, seconds = {}, {}, {}
    RESULTS.mkdir(parents=True, exist_ok=True)
    for run in runs(args.synthetic, args.stages):
        result_file = RAW / run.name / "results.json"
        skip = (args.reuse or (args.only and run.name not in args.only)) and result_file.exists()
        if not skip:
            print(f"== {run.name}: {run.what}", file=sys.stderr, flush=True)
            begin = time.perf_counter()
            code = cli.run(run.argv)
            if code != 0:
                print(f"report: run {run.name} failed with exit status {code}", file=sys.stderr)
                return code
            seconds[run.name] = time.perf_counter() - begin
        record = json.loads(result_file.read_text())
        seconds.setdefault(run.name, record.get("elapsed_s", float("nan")))
        record["elapsed_s"] = seconds[run.name]
        records[run.name] = record
        commands[run.name] = record["command"].replace(str(ROOT) + "/", "")
        (RESULTS / f"{run.name}.json").write_text(json.dumps(record, indent=1) + "\n")
        result_file.write_text(json.dumps(record, indent=1) + "\n")
    picture_grid(RAW / "photos" / "maps.npz", HERE / "photos_grid.png")
    if "synthetic" in records:
        picture_grid(RAW / "synthetic" / "maps.npz", HERE / "synthetic_grid.png", rows=range(6), boxes=True)
    report = write_report(records, commands, seconds, started, time.perf_counter() - t0)
    (HERE / "REPORT.md").write_text(report)
    print(f"wrote {HERE / 'REPORT.md'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
