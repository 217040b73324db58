"""Pathway gradient versus one vanilla gradient, same model, same batch, one process.

The physical floor of pathway gradient is two forward and two backward passes
(≈ 2× one vanilla gradient: forward + backward) plus a top-k over all neurons.
Run: ``make bench`` (or ``.venv/bin/python benchmarks/speed/engine.py``). Writes
``benchmarks/speed/results/engine-<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.common import git_revision, machine, time_call, write_results  # noqa: E402
from handler.engine import METHODS, explaining  # noqa: E402
from handler.models import load_model, spec_for_architecture  # noqa: E402

CPU_CASES = [("efficientnet_lite0", 1), ("efficientnet_lite0", 8), ("resnet50", 1), ("resnet50", 8)]
GPU_CASES = [("efficientnet_lite0", 1), ("efficientnet_lite0", 8), ("efficientnet_lite0", 32),
             ("resnet50", 1), ("resnet50", 16), ("resnet50", 64)]


def load(name: str, device):
    if name == "efficientnet_lite0":
        return load_model("efficientnet_lite0", device=device).module
    return load_model(spec_for_architecture(name), device=device).module  # random weights: speed is the same


def bench_case(name: str, batch: int, device: torch.device, repeat: int) -> dict:
    model = load(name, device)
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 224, 224, device=device)
    targets = torch.full((batch,), -1, device=device, dtype=torch.long)
    gradient = METHODS.get("gradient")
    pathway = METHODS.get("pathway_gradient")
    with explaining(model):
        vanilla = time_call(lambda: gradient(model, x, targets), device, repeat=repeat)
        path = time_call(lambda: pathway(model, x, targets, sparsity=[0.7] * batch), device, repeat=repeat)
    return {
        "model": name, "batch": batch, "device": str(device),
        "vanilla_gradient_s": vanilla["median_s"], "pathway_gradient_s": path["median_s"],
        "ratio": path["median_s"] / vanilla["median_s"],
        "per_image_pathway_ms": 1000 * path["median_s"] / batch,
        "runs": {"vanilla": vanilla, "pathway": path},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "speed" / "results")
    args = parser.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    cases = GPU_CASES if device.type == "cuda" else CPU_CASES
    rows = []
    for name, batch in cases:
        row = bench_case(name, batch, device, args.repeat)
        rows.append(row)
        print(f"{name} b={batch}: vanilla {row['vanilla_gradient_s'] * 1000:.1f} ms, pathway "
              f"{row['pathway_gradient_s'] * 1000:.1f} ms, ratio {row['ratio']:.2f}", flush=True)
    info = machine()
    lines = [
        f"# Engine speed: pathway gradient / vanilla gradient ({device.type})",
        "",
        f"Machine: {info.get('gpu', info['cpu'])}; {info['cpu_count']} CPU cores, torch {info['torch']} "
        f"({info['torch_threads']} threads); revision {git_revision()}.",
        "Same model, batch and process; medians of repeated runs after warm-up. Sparsity 0.7, target = predicted "
        "class. Vanilla gradient = one forward + backward to the input. Target: ratio <= 2.3.",
        "",
        "| model | batch | vanilla gradient (ms) | pathway gradient (ms) | ratio | pathway ms / image |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['vanilla_gradient_s'] * 1000:.1f} | "
                     f"{r['pathway_gradient_s'] * 1000:.1f} | {r['ratio']:.2f} | {r['per_image_pathway_ms']:.1f} |")
    write_results(args.out, f"engine-{device.type}", {"machine": info, "revision": git_revision(), "results": rows},
                  "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
