"""Speed and memory of the explanation engine against its baselines: same model, batch and process.

Per model and batch, interleaved round by round so that machine noise hits every method alike:

- ``vanilla``   the engine's gradient: one forward and one backward to the input (the unit of every ratio);
- ``pathway``   the engine's pathway gradient (selection + pathway pass), as ``METHODS["pathway_gradient"]``;
- ``explainer`` the same through ``Explainer.explain``: plus per-site summaries, reduction, packaging;
- ``naive``     the method of docs/methods.md written the obvious way, one image at a time (``naive.py``);
- ``ig15``, ``ig50`` Captum integrated gradients with 15 steps (stock TorchServe's explainer) and 50.

and, for the pathway, its phases (scoring pass, threshold, pathway pass) timed alone. Peak memory per method:
process RSS above the level before the call on the CPU, CUDA's peak allocated memory on a GPU.

Run: ``make bench`` (= ``.venv/bin/python benchmarks/speed/run.py``); ``--full`` for every model at batch
1, 8 and 32. The device is CUDA when available (the GPU set), else the CPU (a reduced set that runs in
minutes on two cores). Writes ``benchmarks/speed/results/suite-<device>[-full].{json,md}``.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.common import PeakMemory, git_revision, machine, sync, write_results  # noqa: E402
from benchmarks.speed.naive import naive_pathway_gradient  # noqa: E402
from handler.engine import METHODS, Explainer, explaining  # noqa: E402
from handler.engine.methods import input_gradient  # noqa: E402
from handler.engine.contribution import _abs_contribution, score_neurons, select_by_contribution  # noqa: E402
from handler.engine.pathways import run_along  # noqa: E402
from handler.engine.threshold import keep_above_quantile  # noqa: E402
from handler.models import load_model, spec_for_architecture  # noqa: E402

ALL_METHODS = ("vanilla", "pathway", "explainer", "naive", "ig15", "ig50")
#: Environment variables that change the timings; recorded with the results.
ENVIRONMENT = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "THP_MEM_ALLOC_ENABLE", "OMP_NUM_THREADS",
               "MKL_NUM_THREADS", "LD_PRELOAD", "CUDA_VISIBLE_DEVICES")
SPARSITY = 0.7


@dataclass(frozen=True)
class Case:
    model: str
    batch: int
    methods: tuple = ALL_METHODS


# The CPU default: what two shared cores get through in minutes. IG and the naive version only at small
# batches (IG-50 on VGG-16 alone is ~50 forward/backward passes of a 15-GFLOP network per image).
CPU_CASES = [
    Case("efficientnet_lite0", 1), Case("efficientnet_lite0", 8, ("vanilla", "pathway", "explainer", "naive", "ig15")),
    Case("resnet50", 1), Case("resnet50", 8, ("vanilla", "pathway", "explainer", "naive")),
    Case("vgg16", 1, ("vanilla", "pathway", "explainer", "naive", "ig15")),
]
CPU_FULL_CASES = [Case(m, b) for m in ("efficientnet_lite0", "resnet50", "vgg16") for b in (1, 8, 32)]
GPU_CASES = [
    Case("efficientnet_lite0", 1), Case("efficientnet_lite0", 8), Case("efficientnet_lite0", 32),
    Case("efficientnet_lite0", 64, ("vanilla", "pathway", "explainer")),
    Case("resnet50", 1), Case("resnet50", 16), Case("resnet50", 64, ("vanilla", "pathway", "explainer", "ig15")),
    Case("vgg16", 1), Case("vgg16", 16, ("vanilla", "pathway", "explainer", "naive", "ig15")),
    Case("vgg16", 32, ("vanilla", "pathway", "explainer")),
]
GPU_FULL_CASES = [Case(m, b) for m in ("efficientnet_lite0", "resnet50", "vgg16") for b in (1, 8, 16, 32, 64)]


def load(name: str, device: torch.device, as_trained: bool = False):
    """The real EfficientNet-Lite0; other architectures with random weights (same speed as trained ones).
    Prepared for inference as the server loads it (handler.models.preparation) unless ``as_trained``."""
    spec = "efficientnet_lite0" if name == "efficientnet_lite0" else spec_for_architecture(name)
    return load_model(spec, device=device, prepare=False if as_trained else None).module.eval()


@dataclass
class Timing:
    samples: list = field(default_factory=list)
    peak_bytes: Optional[int] = None

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def run_case(case: Case, device: torch.device, args) -> dict:
    model = load(case.model, device, args.as_trained)
    torch.manual_seed(0)
    x = torch.randn(case.batch, 3, 224, 224, device=device)
    auto = torch.full((case.batch,), -1, device=device, dtype=torch.long)
    with torch.no_grad():
        predicted = model(x).argmax(1)
    explainer = Explainer(model, device=device, default_sparsity=SPARSITY)
    explainer.explain(x[:1])  # the one-time instrumentation check, outside the timings
    ig_batch = args.ig_internal_batch or (64 if device.type == "cuda" else 16)

    def captum_ig(steps):
        from captum.attr import IntegratedGradients

        ig = IntegratedGradients(model)
        return lambda: ig.attribute(x, baselines=0.0, target=predicted, n_steps=steps,
                                    internal_batch_size=min(ig_batch, steps * case.batch))

    calls: dict = {
        "vanilla": lambda: METHODS.get("gradient")(model, x, auto),
        "pathway": lambda: METHODS.get("pathway_gradient")(model, x, auto, sparsity=[SPARSITY] * case.batch),
        "explainer": lambda: explainer.explain(x),
        "naive": lambda: naive_pathway_gradient(model, x, [-1] * case.batch, SPARSITY),
        "ig15": captum_ig(15),
        "ig50": captum_ig(50),
    }
    methods = [m for m in case.methods if m in args.methods]
    if "vanilla" not in methods:
        methods.insert(0, "vanilla")
    phases: dict = {}
    with explaining(model):
        pathway = select_by_contribution(model, x, auto, [SPARSITY] * case.batch)
        scores = score_neurons(model, x, auto, _abs_contribution)[0]
        if "pathway" in methods and not args.no_phases:
            phases = {
                "scoring pass": lambda: score_neurons(model, x, auto, _abs_contribution),
                "threshold": lambda: keep_above_quantile(scores, [SPARSITY] * case.batch),
                "pathway pass": lambda: input_gradient(lambda inp: run_along(model, inp, pathway), x, pathway.targets),
            }
        timings = measure({m: calls[m] for m in methods}, phases, device, args)
    del scores, pathway
    neurons = explainer._neurons.get(tuple(x.shape[1:]))
    # the [B, N] float scores: on the CPU a workspace kept between calls, so not in the per-call deltas
    workspace_mib = (neurons or 0) * case.batch * x.element_size() / 2**20
    vanilla = timings["vanilla"].median
    row = {"model": case.model, "batch": case.batch, "device": str(device), "neurons_per_sample": neurons,
           "score_workspace_mib": workspace_mib, "methods": {}, "phases": {}}
    for name, t in timings.items():
        entry = {"median_s": t.median, "min_s": min(t.samples), "max_s": max(t.samples), "runs": len(t.samples),
                 "ratio_to_vanilla": t.median / vanilla, "ms_per_image": 1000 * t.median / case.batch}
        if name in calls:
            entry["peak_mib"] = None if t.peak_bytes is None else t.peak_bytes / 2**20
            row["methods"][name] = entry
        else:
            row["phases"][name] = entry
    return row


def measure(calls: dict, phases: dict, device: torch.device, args) -> dict:
    """Warm each call up once, then time them round-robin; slow ones get fewer rounds (at least two)."""
    everything = {**calls, **phases}
    timings = {name: Timing() for name in everything}
    first = {}
    for name, fn in everything.items():
        with PeakMemory(device) as peak:
            first[name] = _timed(fn, device)
        if name in calls:
            timings[name].peak_bytes = peak.bytes
        print(f"    {name}: warm-up {first[name] * 1000:.0f} ms", flush=True)
    quota = {name: max(2, min(args.repeat, math.ceil(args.seconds_per_method / max(first[name], 1e-3))))
             for name in everything}
    for r in range(max(quota.values())):
        for name, fn in everything.items():
            if r < quota[name]:
                timings[name].samples.append(_timed(fn, device))
    return timings


def _timed(fn: Callable, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


LABELS = {"vanilla": "vanilla gradient", "pathway": "pathway gradient", "explainer": "Explainer (pathway, end to end)",
          "naive": "naive per-image", "ig15": "Captum IG, 15 steps", "ig50": "Captum IG, 50 steps"}


def markdown(rows: list, info: dict, device: torch.device, args, wall_s: float, load: tuple) -> str:
    methods = [m for m in ALL_METHODS if any(m in r["methods"] for r in rows)]
    where = info.get("gpu") or info["cpu"]
    lines = [
        f"# Explanation speed and memory ({device.type}{', full set' if args.full else ''})",
        "",
        f"Machine: {where}; {info['cpu_count']} CPU cores; torch {info['torch']} ({info['torch_threads']} threads), "
        f"torchvision {info.get('torchvision')}, timm {info.get('timm')}, captum {info.get('captum')}, "
        f"numpy {info.get('numpy')}, Python {info['python']}"
        + (f", CUDA {info['cuda']}" if info.get("cuda") else "") + f"; revision {git_revision()}.",
        f"Suite wall time {wall_s / 60:.1f} min; load average {load[0]:.1f} at the start, {load[1]:.1f} at the end "
        f"({info['cpu_count']} cores: above that, other processes shared the CPU and times are inflated). "
        f"Allocator environment: {', '.join(f'{k}={v}' for k, v in info.get('environment', {}).items()) or 'default'}.",
        "",
        f"Same model, batch and process; median of interleaved rounds after one warm-up. Sparsity {SPARSITY}, "
        "target = predicted class, 224x224 inputs; efficientnet_lite0 has its ImageNet weights, resnet50 and vgg16 "
        "random ones (same speed). "
        + ("Models as trained (no inference preparation). " if args.as_trained else
           "Models prepared as the server loads them (BatchNorm folded, channels-last on the CPU). ") + " The ratio in brackets is the time over the vanilla gradient's (one forward + "
        "one backward). Captum IG runs with `internal_batch_size` "
        f"{args.ig_internal_batch or (64 if device.type == 'cuda' else 16)}.",
        "",
        "## Time per batch, ms (ratio to the vanilla gradient)",
        "",
        "| model | batch | neurons / image | " + " | ".join(LABELS[m] for m in methods) + " |",
        "|---|---:|---:|" + "---:|" * len(methods),
    ]
    for r in rows:
        cells = []
        for m in methods:
            e = r["methods"].get(m)
            cells.append("–" if e is None else (f"{e['median_s'] * 1000:.1f}" if m == "vanilla" else
                                                f"{e['median_s'] * 1000:.1f} ({e['ratio_to_vanilla']:.2f}×)"))
        neurons = f"{r['neurons_per_sample'] / 1e6:.1f} M" if r["neurons_per_sample"] else "?"
        lines.append(f"| {r['model']} | {r['batch']} | {neurons} | " + " | ".join(cells) + " |")
    unit = "peak allocated GPU memory" if device.type == "cuda" else "peak process RSS above the level before the call"
    lines += ["", f"## Peak memory per call, MiB ({unit})", ""]
    if device.type == "cpu":
        lines += ["On the CPU the engine keeps its [B, N] score buffer between calls (a per-thread workspace, "
                  "`contribution.SCORE_WORKSPACE_BYTES`), so it is resident before the call and not in the pathway "
                  "columns; its size (B x N x 4 bytes) is the last column. The naive version holds one image at a "
                  "time.", ""]
    extra = " | score buffer (workspace) |" if device.type == "cpu" else " |"
    lines += ["| model | batch | " + " | ".join(LABELS[m] for m in methods) + extra,
              "|---|---:|" + "---:|" * (len(methods) + (device.type == "cpu"))]
    for r in rows:
        cells = []
        for m in methods:
            e = r["methods"].get(m)
            cells.append("–" if e is None or e.get("peak_mib") is None else f"{e['peak_mib']:.0f}")
        if device.type == "cpu":
            cells.append(f"{r.get('score_workspace_mib', 0):.0f}")
        lines.append(f"| {r['model']} | {r['batch']} | " + " | ".join(cells) + " |")
    if any(r["phases"] for r in rows):
        lines += ["", "## Pathway gradient by phase, ms (ratio to the vanilla gradient)", "",
                  "Each phase timed alone in the same rounds: the scoring pass (forward, backward to the first "
                  "site, |a·g| into one [B, N] buffer), the per-sample threshold and mask over all N neurons, and "
                  "the pathway pass (masked forward and backward to the input).", "",
                  "| model | batch | scoring pass | threshold + mask | pathway pass | sum | pathway gradient |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            if not r["phases"]:
                continue
            ph = r["phases"]
            total = sum(ph[p]["median_s"] for p in ph)
            ratio = total / r["methods"]["vanilla"]["median_s"]
            cells = [f"{ph[p]['median_s'] * 1000:.1f} ({ph[p]['ratio_to_vanilla']:.2f}×)"
                     for p in ("scoring pass", "threshold", "pathway pass")]
            path = r["methods"].get("pathway")
            lines.append(f"| {r['model']} | {r['batch']} | " + " | ".join(cells) + f" | {total * 1000:.1f} "
                         f"({ratio:.2f}×) | " + ("–" if path is None else
                                                  f"{path['median_s'] * 1000:.1f} ({path['ratio_to_vanilla']:.2f}×)")
                         + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    parser.add_argument("--full", action="store_true", help="every model at batch 1, 8 and 32 (CPU: hours)")
    parser.add_argument("--models", help="comma-separated subset of the cases' models")
    parser.add_argument("--batches", help="comma-separated batch sizes (replaces the cases' batches)")
    parser.add_argument("--methods", default=",".join(ALL_METHODS), help="comma-separated subset of " +
                        ", ".join(ALL_METHODS))
    parser.add_argument("--repeat", type=int, default=7, help="timed rounds per method at most (default 7)")
    parser.add_argument("--seconds-per-method", type=float, default=6.0,
                        help="slow methods get fewer rounds: about this many seconds each, at least two rounds")
    parser.add_argument("--ig-internal-batch", type=int, help="Captum's internal_batch_size (default 16 CPU, 64 GPU)")
    parser.add_argument("--no-phases", action="store_true", help="skip the pathway's per-phase timings")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, one per core); "
                        "on a shared machine 1 keeps other processes from stalling OpenMP barriers")
    parser.add_argument("--stem", help="result file stem (default suite-<device>[-full][-as-trained])")
    parser.add_argument("--as-trained", action="store_true",
                        help="the models as trained, without the inference preparation the server applies")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "speed" / "results")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
    unknown = set(args.methods) - set(ALL_METHODS)
    if unknown:
        parser.error(f"unknown methods: {', '.join(sorted(unknown))}")
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        cases = GPU_FULL_CASES if args.full else GPU_CASES
    else:
        cases = CPU_FULL_CASES if args.full else CPU_CASES
    if args.models:
        wanted = [m.strip() for m in args.models.split(",")]
        cases = [c for c in cases if c.model in wanted] or [Case(m, 1) for m in wanted]
    if args.batches:
        batches = [int(b) for b in args.batches.split(",")]
        seen = {}
        for c in cases:
            seen.setdefault(c.model, c.methods)
        cases = [Case(m, b, methods) for m, methods in seen.items() for b in batches]

    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    start = time.perf_counter()
    rows = []
    for case in cases:
        print(f"{case.model} batch {case.batch} on {device}", flush=True)
        row = run_case(case, device, args)
        rows.append(row)
        summary = ", ".join(f"{m} {e['median_s'] * 1000:.0f} ms ({e['ratio_to_vanilla']:.2f}x)"
                            for m, e in row["methods"].items())
        print(f"  {summary}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    wall = time.perf_counter() - start
    load_end = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    info = machine()
    for package in ("timm", "captum", "numpy"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    stem = args.stem or f"suite-{device.type}{'-full' if args.full else ''}{'-as-trained' if args.as_trained else ''}"
    info["environment"] = {k: os.environ[k] for k in ENVIRONMENT if k in os.environ}
    payload = {"machine": info, "revision": git_revision(), "device": str(device), "sparsity": SPARSITY,
               "wall_s": wall, "load_average": {"start": load_start, "end": load_end},
               "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
               "results": rows}
    write_results(args.out, stem, payload, markdown(rows, info, device, args, wall, (load_start, load_end)))


if __name__ == "__main__":
    main()
