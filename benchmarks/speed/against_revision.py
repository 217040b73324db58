"""The engine suite's pathway/vanilla figures of an earlier revision and of this checkout, alternated in one session.

A ratio measured on another day, or another host, says little on these shared VMs (run-to-run spread of
±10–20 %). This script checks the earlier revision out into a temporary git worktree and runs
``benchmarks/speed/run.py`` there and here in turn, ``--runs`` times, so machine drift hits both alike.
Each side runs as it was served at its revision (the earlier code on its own model loading, this checkout
with its inference preparation; ``--as-trained`` runs this checkout on the models as trained, which tells
the engine's changes from the preparation's). Reported per model and batch, each as the median and range over the runs:

- the vanilla gradient (one forward + one backward) and the pathway gradient, in ms;
- pathway / vanilla, the ratio the engine suite reports;
- pathway − 2 × vanilla: what the pathway costs beyond its two passes (scores, threshold, masks, Python).
  A change that makes the convolutions cheaper raises the ratio while this stays put; a change that makes
  the per-neuron work cheaper lowers this.

The earlier revision's ``run.py`` must accept ``--models --batches --methods --no-phases --threads --stem
--out`` (every revision since the suite got ``--threads``). Run:

    .venv/bin/python benchmarks/speed/against_revision.py --revision 10412b7 --threads 1 --stem NAME

Writes ``benchmarks/speed/results/NAME.{json,md}``; the worktree is removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.common import git_revision, write_results  # noqa: E402

SIDES = ("earlier", "current")


def suite_command(python: str, out: Path, stem: str, args, current: bool) -> list:
    cmd = [python, "benchmarks/speed/run.py", "--models", args.models, "--batches", args.batches,
           "--methods", "vanilla,pathway", "--no-phases", "--stem", stem, "--out", str(out)]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    if current and args.as_trained:
        cmd.append("--as-trained")
    return cmd


def run_suite(tree: Path, out: Path, stem: str, args, current: bool) -> dict:
    """One engine-suite run inside ``tree`` (its own ``handler`` package first on the path); its JSON payload."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    subprocess.run(suite_command(sys.executable, out, stem, args, current), cwd=tree, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads((out / f"{stem}.json").read_text())


def summarise(payloads: dict) -> list:
    """Rows per (model, batch) from ``{side: [suite payloads]}``: each figure's median and range over the runs."""
    figures: dict = {}
    for side, runs in payloads.items():
        for payload in runs:
            for row in payload["results"]:
                methods = row["methods"]
                if "vanilla" not in methods or "pathway" not in methods:
                    continue
                vanilla = methods["vanilla"]["median_s"] * 1e3
                pathway = methods["pathway"]["median_s"] * 1e3
                entry = figures.setdefault((row["model"], row["batch"]), {}).setdefault(
                    side, {"vanilla_ms": [], "pathway_ms": [], "ratio": [], "beyond_two_passes_ms": []})
                entry["vanilla_ms"].append(vanilla)
                entry["pathway_ms"].append(pathway)
                entry["ratio"].append(pathway / vanilla)
                entry["beyond_two_passes_ms"].append(pathway - 2 * vanilla)
    rows = []
    for (model, batch), sides in figures.items():
        row = {"model": model, "batch": batch}
        for side, values in sides.items():
            row[side] = {name: {"median": statistics.median(v), "min": min(v), "max": max(v), "runs": v}
                         for name, v in values.items()}
        rows.append(row)
    return rows


def _cell(figure: Optional[dict], digits: int, unit: str = "") -> str:
    if figure is None:
        return "—"
    return (f"{figure['median']:.{digits}f}{unit} ({figure['min']:.{digits}f}–{figure['max']:.{digits}f})")


def markdown(rows: list, info: dict) -> str:
    lines = [
        f"# Engine suite: revision {info['earlier_revision']} against {info['current_revision']}, alternated",
        "",
        f"Machine: {info['machine'].get('cpu', '?')}; {info['machine'].get('cpu_count', '?')} CPU cores, torch "
        f"{info['machine'].get('torch', '?')} ({info['machine'].get('torch_threads', '?')} thread(s)). "
        f"{info['runs']} runs of `benchmarks/speed/run.py --methods vanilla,pathway` per side, earlier and current "
        f"in turn; each figure is the median over the runs (each run's own figure is its median of interleaved "
        f"rounds), the range in brackets. Load average {info['load'][0]:.1f} at the start, {info['load'][1]:.1f} "
        f"at the end. {info['current_revision']} ran the models "
        f"{'as trained (`--as-trained`)' if info.get('current_as_trained') else 'prepared as the server loads them'}"
        f". Produced by `benchmarks/speed/against_revision.py`.",
        "",
        "| model | batch | revision | vanilla gradient (ms) | pathway gradient (ms) | pathway / vanilla "
        "| pathway − 2 × vanilla (ms) |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for row in rows:
        for side, revision in zip(SIDES, (info["earlier_revision"], info["current_revision"])):
            figures = row.get(side, {})
            lines.append(
                f"| {row['model']} | {row['batch']} | {revision} | {_cell(figures.get('vanilla_ms'), 1)} "
                f"| {_cell(figures.get('pathway_ms'), 1)} | {_cell(figures.get('ratio'), 2, '×')} "
                f"| {_cell(figures.get('beyond_two_passes_ms'), 1)} |")
    lines += ["", "Compare only within this file: both revisions ran in the same minutes on the same machine.", ""]
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revision", required=True, help="the earlier git revision (any name git accepts)")
    parser.add_argument("--runs", type=int, default=3, help="suite runs per side, alternated (default 3)")
    parser.add_argument("--models", default="efficientnet_lite0,resnet50")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--threads", type=int, help="torch intra-op threads for both sides (default: torch's)")
    parser.add_argument("--as-trained", action="store_true",
                        help="run this checkout's side on the models as trained (no inference preparation), to "
                             "tell the engine's changes from the preparation's")
    parser.add_argument("--stem", required=True, help="result file stem")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "speed" / "results")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    earlier = subprocess.run(["git", "rev-parse", "--short", args.revision], cwd=ROOT, capture_output=True,
                             text=True)
    if earlier.returncode != 0:
        parser.error(f"unknown revision {args.revision!r}: {earlier.stderr.strip()}")
    earlier_revision = earlier.stdout.strip()
    load_start = os.getloadavg()[0]
    payloads: dict = {side: [] for side in SIDES}
    with tempfile.TemporaryDirectory(prefix="against-revision-") as scratch:
        tree, out = Path(scratch) / "tree", Path(scratch) / "out"
        subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(tree), earlier_revision], cwd=ROOT,
                       check=True)
        try:
            for i in range(args.runs):
                payloads["earlier"].append(run_suite(tree, out, f"earlier-{i}", args, current=False))
                payloads["current"].append(run_suite(ROOT, out, f"current-{i}", args, current=True))
                print(f"run {i + 1}/{args.runs} done", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=False)
    info = {"earlier_revision": earlier_revision, "current_revision": git_revision(), "runs": args.runs,
            "current_as_trained": args.as_trained,
            "machine": payloads["current"][0]["machine"], "load": (load_start, os.getloadavg()[0])}
    rows = summarise(payloads)
    payload = dict(info, options={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   rows=rows, runs={side: [p["results"] for p in runs] for side, runs in payloads.items()})
    write_results(args.out, args.stem, payload, markdown(rows, info))


if __name__ == "__main__":
    main()
