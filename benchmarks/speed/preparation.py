"""Are explanations unchanged by inference preparation? The prepared model's maps against the trained model's.

Loads EfficientNet-Lite0 twice through the public API: as trained (``prepare=False``) and as the server
loads it (BatchNorm folded, channels-last on the CPU: ``handler.models.preparation``), and explains the
five sample photos and scikit-image's other colour photographs with both at the defaults (pathway
gradient, sparsity 0.7). Per photo: Pearson of the two maps, whether the top prediction and the
explained class agree, and the kept neurons of each pathway. For scale, the same comparison for two
changes that are not preparation at all: the trained model at 1 thread instead of the default, and at a
pass shape of 4 instead of 1 (the neuron threshold is sensitive to float rounding; each of these moves a
few near-tie neurons across it). Also the time of one explanation with each model, interleaved.

Run: ``.venv/bin/python benchmarks/speed/preparation.py`` (about 2 minutes on 2 CPU cores); writes
``benchmarks/speed/results/preparation-<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.common import git_revision, machine, write_results  # noqa: E402
from handler import ExplanationService  # noqa: E402
from handler.models import load_model  # noqa: E402
from handler.service import cpu_threads  # noqa: E402
from handler.samples import SAMPLE_PHOTOS, sample_dir, sample_photo  # noqa: E402

#: scikit-image's other colour photographs (never used to tune anything here).
OTHER_PHOTOS = ("motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "ihc.png", "color.png")


def photos() -> list:
    found = [(name, sample_photo(name)) for name in SAMPLE_PHOTOS]
    found += [(Path(f).stem, sample_dir() / f) for f in OTHER_PHOTOS if (sample_dir() / f).exists()]
    return found


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() == 0 or b.std() == 0:
        return float(np.array_equal(a, b))
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def explain(service: ExplanationService, data: bytes):
    [result] = service.explain_images([data])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "speed" / "results")
    parser.add_argument("--rounds", type=int, default=5, help="timed explanations per model (interleaved)")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    trained = ExplanationService(load_model("efficientnet_lite0", device=device, prepare=False), device=device)
    prepared = ExplanationService(load_model("efficientnet_lite0", device=device), device=device)
    passes_of_4 = ExplanationService(load_model("efficientnet_lite0", device=device, prepare=False), device=device,
                                     pass_batch=4)
    threads = torch.get_num_threads()
    rows = []
    for name, path in photos():
        data = path.read_bytes()
        a, b, c = explain(trained, data), explain(prepared, data), explain(passes_of_4, data)
        with cpu_threads(1):
            d = explain(trained, data)
        shown = [r.document for r in (a, b)]
        rows.append({
            "photo": name,
            "top_trained": shown[0]["predictions"][0]["label"],
            "same_top": shown[0]["predictions"][0]["index"] == shown[1]["predictions"][0]["index"],
            "same_target": shown[0]["explanation"]["target"]["index"] == shown[1]["explanation"]["target"]["index"],
            "pearson_prepared": pearson(a.attribution, b.attribution),
            "kept_trained": shown[0]["explanation"]["pathway"]["kept_neurons"],
            "kept_prepared": shown[1]["explanation"]["pathway"]["kept_neurons"],
            "pearson_1_thread": pearson(a.attribution, d.attribution),
            "pearson_pass_4": pearson(a.attribution, c.attribution),
        })
        print(rows[-1], flush=True)
    photo = sample_photo("coffee").read_bytes()
    times: dict = {"trained": [], "prepared": []}
    for _ in range(args.rounds + 1):
        for label, service in (("trained", trained), ("prepared", prepared)):
            start = time.perf_counter()
            explain(service, photo)
            times[label].append(time.perf_counter() - start)
    ms = {k: 1000 * statistics.median(v[1:]) for k, v in times.items()}
    info = machine()
    samples = [r for r in rows if r["photo"] in SAMPLE_PHOTOS]
    lines = [
        f"# Explanations on the prepared model vs the model as trained ({device})",
        "",
        f"Machine: {info.get('gpu', info['cpu'])}; {info['cpu_count']} CPU cores, torch {info['torch']} "
        f"({threads} threads); revision {git_revision()}; load average {os.getloadavg()[0]:.1f} at the end. "
        f"EfficientNet-Lite0 (real weights), pathway gradient at sparsity 0.7, the default reduction; "
        f"prepared = `{prepared.preparation}`. The last two columns compare the trained model with itself "
        "under changes that are not preparation: 1 thread instead of the default, and a pass shape of 4.",
        "",
        "| photo | top class (trained) | same top / explained class | Pearson, prepared | kept neurons, trained "
        "/ prepared | Pearson, 1 thread | Pearson, pass of 4 |",
        "|---|---|---|---:|---|---:|---:|",
    ]
    for r in rows:
        sample = " (sample)" if r["photo"] in SAMPLE_PHOTOS else ""
        lines.append(f"| {r['photo']}{sample} | {r['top_trained']} | {'yes' if r['same_top'] else 'NO'} / "
                     f"{'yes' if r['same_target'] else 'NO'} | {r['pearson_prepared']:.4f} | {r['kept_trained']} / "
                     f"{r['kept_prepared']} | {r['pearson_1_thread']:.4f} | {r['pearson_pass_4']:.4f} |")
    lowest = min(samples, key=lambda r: r["pearson_prepared"])
    lines += [
        "",
        f"- Sample photos: lowest Pearson prepared vs trained {lowest['pearson_prepared']:.4f} ({lowest['photo']}), "
        f"goal ≥ 0.99; same top prediction on {sum(r['same_top'] for r in samples)} of {len(samples)}.",
        f"- All photos: lowest {min(r['pearson_prepared'] for r in rows):.4f}; a thread-count change alone: lowest "
        f"{min(r['pearson_1_thread'] for r in rows):.4f}.",
        f"- One explanation of the coffee photo (service, pass shape 1, median of {args.rounds}, interleaved): "
        f"trained {ms['trained']:.0f} ms, prepared {ms['prepared']:.0f} ms ({ms['prepared'] / ms['trained']:.2f}×).",
    ]
    write_results(args.out, f"preparation-{device}", {"machine": info, "revision": git_revision(),
                                                       "preparation": prepared.preparation, "rows": rows,
                                                       "explain_ms": ms}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
