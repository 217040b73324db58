"""Pathway gradient / vanilla gradient of the engine, and what the CPU memory allocator does to that ratio.

The quick check behind the suite (``run.py``): the engine's pathway gradient and ``Explainer`` against one
vanilla gradient, same model, batch and process, interleaved rounds. On the CPU each case runs twice, in
fresh processes: with glibc's default allocator, which returns every block above 32 MB to the system
when it is freed (so the next call page-faults all of it in again, ~2.5 µs per 4 KiB page here), and with
freed memory retained (``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``, the settings ``pathway-serve`` gives
TorchServe's workers: ``handler.serving.launcher.RETAINED_HEAP``).
Pathway gradient allocates more than a vanilla gradient (a second pass, the [B, N] scores and mask), so
page faults inflate its ratio at large batches. Writes ``results/engine-<device>.{json,md}``.

Run: ``.venv/bin/python benchmarks/speed/engine.py`` (``make bench-engine``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.common import git_revision, machine, write_results  # noqa: E402
from handler.serving.launcher import RETAINED_HEAP  # noqa: E402

CASES = [("efficientnet_lite0", 1), ("efficientnet_lite0", 8), ("resnet50", 1), ("resnet50", 8)]
GPU_CASES = [("efficientnet_lite0", 1), ("efficientnet_lite0", 8), ("efficientnet_lite0", 32),
             ("resnet50", 1), ("resnet50", 16), ("resnet50", 64)]
#: glibc keeps freed memory for reuse instead of unmapping it (what jemalloc/tcmalloc do by default).
ALLOCATORS = {"default": {}, "retained heap": RETAINED_HEAP}


def worker(args) -> None:
    """One allocator setting, in this process: print the rows as JSON."""
    from benchmarks.speed import run

    device = torch.device(args.device)
    options = argparse.Namespace(methods=("vanilla", "pathway", "explainer"), repeat=args.repeat,
                                 seconds_per_method=args.seconds, ig_internal_batch=None, no_phases=True,
                                 as_trained=False)  # the models prepared as the server loads them
    rows = []
    for name, batch in _cases(args):
        rows.append(run.run_case(run.Case(name, batch, ("vanilla", "pathway", "explainer")), device, options))
        print(f"  {name} b={batch}: pathway/vanilla {rows[-1]['methods']['pathway']['ratio_to_vanilla']:.2f}",
              file=sys.stderr, flush=True)
    print(json.dumps(rows))


def _cases(args):
    cases = GPU_CASES if args.device.startswith("cuda") else CASES
    if args.models:
        cases = [c for c in cases if c[0] in args.models.split(",")]
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--models", help="comma-separated subset")
    parser.add_argument("--repeat", type=int, default=9)
    parser.add_argument("--seconds", type=float, default=8.0, help="about this many seconds per method and case")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "speed" / "results")
    args = parser.parse_args()
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        return worker(args)
    settings = ALLOCATORS if args.device == "cpu" else {"default": {}}
    results = {}
    for label, env in settings.items():
        print(f"allocator: {label}", flush=True)
        command = [sys.executable, __file__, "--worker", "--device", args.device, "--repeat", str(args.repeat),
                   "--seconds", str(args.seconds)] + (["--models", args.models] if args.models else []) \
            + (["--threads", str(args.threads)] if args.threads else [])
        done = subprocess.run(command, env={**os.environ, **env}, stdout=subprocess.PIPE, check=True, text=True)
        results[label] = json.loads(done.stdout.strip().splitlines()[-1])
    info = machine()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = [
        f"# Engine: pathway gradient / vanilla gradient ({args.device})",
        "",
        f"Machine: {info.get('gpu', info['cpu'])}; {info['cpu_count']} CPU cores, torch {info['torch']} "
        f"({info['torch_threads']} threads); revision {git_revision()}; load average {load:.1f} at the end.",
        "Models prepared as the server loads them (BatchNorm folded, channels-last on the CPU). "
        "Same model, batch and process; medians of interleaved rounds after a warm-up. Sparsity 0.7, target = the "
        "predicted class. Ratio = time / one vanilla gradient (forward + backward to the input).",
    ]
    if args.device == "cpu":
        lines += ["Each allocator setting runs in its own process: `default` is glibc as shipped; `retained heap` sets "
                  + ", ".join(f"`{k}={v}`" for k, v in RETAINED_HEAP.items()) + " (freed memory is reused instead of "
                  "being unmapped and page-faulted in again on the next call)."]
    lines += ["", "| model | batch | allocator | vanilla (ms) | pathway gradient (ms) | ratio | Explainer (ms) | ratio |",
              "|---|---:|---|---:|---:|---:|---:|---:|"]
    for label, rows in results.items():
        for r in rows:
            m = r["methods"]
            lines.append(f"| {r['model']} | {r['batch']} | {label} | {m['vanilla']['median_s'] * 1000:.1f} | "
                         f"{m['pathway']['median_s'] * 1000:.1f} | {m['pathway']['ratio_to_vanilla']:.2f} | "
                         f"{m['explainer']['median_s'] * 1000:.1f} | {m['explainer']['ratio_to_vanilla']:.2f} |")
    write_results(args.out, f"engine-{args.device.split(':')[0]}",
                  {"machine": info, "revision": git_revision(), "load_average_end": load,
                   "allocators": {k: v for k, v in settings.items()}, "results": results},
                  "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
