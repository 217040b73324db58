"""What fixed-shape passes (reproducible explanations) cost: throughput and memory, with and without, same run.

An explanation is bit-identical whatever its neighbours only when every pass has the same shape
(``Explainer(pass_batch=N)`` pads each pass with zero images). This runs EfficientNet-Lite0 (real
weights, real photos) on batches as TorchServe forms them (1, 2 and 4 requests with ``batchSize: 4``)
with passes at the batch's own size (``pass_batch=None``, not reproducible) and at fixed shapes 1 and 4,
interleaved in one process (medians of rounds after a warm-up), and records the peak memory of each.
Writes ``results/reproducibility-<device>.{json,md}``.

Run: ``.venv/bin/python benchmarks/speed/reproducibility.py [--device cpu] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.common import PeakMemory, git_revision, machine, sync, write_results  # noqa: E402

ARRIVING = (1, 2, 4)  # requests TorchServe hands the handler together (batchSize 4)
MODES = {"batch's own size (not reproducible)": None, "fixed shape 1": 1, "fixed shape 4": 4}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--note", default="the CPU is shared with other jobs (load average below)")
    args = parser.parse_args(argv)
    from handler import ExplanationService
    from handler.samples import SAMPLE_PHOTOS, sample_photo
    from PIL import Image

    device = torch.device(args.device)
    service = ExplanationService.from_spec("efficientnet_lite0", device=device)
    explainer = service.explainer
    photos = [Image.open(sample_photo(name)).convert("RGB") for name in list(SAMPLE_PHOTOS)[:4]]
    x = service.preprocessor.batch(photos)
    requests = [explainer.validate(explainer.defaults)] * 4

    def call(n, shape):
        explainer.explain_requests(x[:n], requests[:n], pass_batch=shape)
        sync(device)

    seconds = {(n, mode): [] for n in ARRIVING for mode in MODES}
    peak = {}
    for n in ARRIVING:  # warm-up, and the peak memory of each case
        for mode, shape in MODES.items():
            call(n, shape)
            with PeakMemory(device) as memory:
                call(n, shape)
            peak[n, mode] = memory.bytes
    for _ in range(args.rounds):
        for n in ARRIVING:
            for mode, shape in MODES.items():
                start = time.perf_counter()
                call(n, shape)
                seconds[n, mode].append(time.perf_counter() - start)
    load = os.getloadavg()[0]
    rows = []
    for n in ARRIVING:
        base = statistics.median(seconds[n, "batch's own size (not reproducible)"])
        for mode in MODES:
            median = statistics.median(seconds[n, mode])
            rows.append({"requests": n, "passes": mode, "median_s": median, "images_per_s": n / median,
                         "time_vs_unpadded": median / base,
                         "peak_mib": None if peak[n, mode] is None else peak[n, mode] / 2**20,
                         "runs": len(seconds[n, mode])})
    info = machine()
    payload = {"machine": info, "revision": git_revision(), "device": str(device), "load_average_end": load,
               "note": args.note, "model": "efficientnet_lite0", "rows": rows}
    lines = [f"# Reproducibility: fixed-shape passes vs the batch's own size ({device.type})", "",
             f"Machine: {info['cpu']}; {info['cpu_count']} CPU cores, torch {info['torch']} "
             f"({info['torch_threads']} threads){'; GPU ' + info['gpu'] if 'gpu' in info else ''}; revision "
             f"{payload['revision']}; load average {load:.1f} at the end; {args.note}.",
             "EfficientNet-Lite0 (real weights), pathway gradient at sparsity 0.7, 4 sample photos; one process, "
             f"interleaved rounds ({args.rounds}), medians after a warm-up. Peak: memory the call adds (RSS on "
             "the CPU, allocated on CUDA).", "",
             "| requests together | passes | median (ms) | images/s | time vs unpadded | peak (MiB) |",
             "|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['requests']} | {r['passes']} | {1000 * r['median_s']:.0f} | {r['images_per_s']:.1f} | "
                     f"{r['time_vs_unpadded']:.2f} | "
                     f"{'n/a' if r['peak_mib'] is None else format(r['peak_mib'], '.0f')} |")
    write_results(Path(__file__).parent / "results", f"reproducibility-{device.type}", payload,
                  "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
