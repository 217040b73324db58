"""In-process predict paths of one model: which one serves ``/predictions`` (``handler.models.preparation``).

Times one forward (no gradients) of each candidate, same process, same input, interleaved round by round
so that machine noise hits every candidate alike, at 1 and 2 torch threads and batch 1 and 4:

- ``as trained``: the model as loaded, unprepared (what the server ran before preparation);
- ``folded``: BatchNorms folded into their convolutions, contiguous memory;
- ``folded, channels-last``: the same with channels-last weights and input;
- ``frozen``: a frozen TorchScript copy of the prepared model (``torch.jit.optimize_for_inference``),
  what ``prepare.predict = "frozen"`` serves (the stock TorchServe deployment runs a plain trace);
- ``stock trace``: ``torch.jit.trace`` of the unprepared model, as the stock ``image_classifier`` archive of
  ``http_e2e.py`` serves it.

and the memory each prepared copy adds (process RSS before/after building it). On a shared machine
compare the ratios of one run, not figures across runs. Writes ``results/predict-<device>.{json,md}``.

Run: ``.venv/bin/python benchmarks/speed/predict.py [--model efficientnet_lite0] [--repeat 15]``.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.common import git_revision, machine, write_results  # noqa: E402
from handler.models import UNPREPARED, Preparation, example_input, frozen_predictor, get_spec, load_model  # noqa: E402
from handler.models.preparation import prepare_model, set_memory_format  # noqa: E402


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) * 1024
    return 0


def candidates(model_name: str, device: torch.device) -> tuple:
    spec = get_spec(model_name)
    base = load_model(spec, device, prepare=False).module
    x = example_input(spec.preprocessing.crop, device)
    memory = {}
    out = {"as trained": (base, False)}
    before = rss_bytes()
    folded, _ = prepare_model(copy.deepcopy(base), Preparation(memory_format="contiguous"), x)
    out["folded"] = (folded, False)
    memory["folded"] = rss_bytes() - before
    before = rss_bytes()
    folded_cl, _ = prepare_model(copy.deepcopy(base), Preparation(memory_format="channels_last"), x)
    out["folded, channels-last"] = (folded_cl, True)
    memory["folded, channels-last"] = rss_bytes() - before
    before = rss_bytes()
    frozen = frozen_predictor(folded_cl, x)
    if frozen is not None:
        out["frozen"] = (frozen, False)  # lays its input out itself
    memory["frozen"] = rss_bytes() - before
    before = rss_bytes()
    with torch.no_grad():
        stock = torch.jit.trace(base, x, check_trace=False)
    out["stock trace"] = (stock, False)
    memory["stock trace"] = rss_bytes() - before
    set_memory_format(base, "contiguous")
    assert UNPREPARED.predict == "eager"
    return out, memory, spec.preprocessing.crop


def measure(models: dict, size: int, batch: int, device: torch.device, repeat: int) -> dict:
    x = torch.randn(batch, 3, size, size, device=device)
    inputs = {name: x.contiguous(memory_format=torch.channels_last) if cl else x for name, (_, cl) in models.items()}
    samples: dict = {name: [] for name in models}
    with torch.inference_mode():
        for name, (model, _) in models.items():  # warm-up (TorchScript profiles its first calls)
            for _ in range(3):
                model(inputs[name])
        for _ in range(repeat):
            for name, (model, _) in models.items():
                start = time.perf_counter()
                model(inputs[name])
                samples[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(s) for name, s in samples.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="efficientnet_lite0")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args(argv)
    device = torch.device("cpu")
    load_start = os.getloadavg()[0]
    models, memory, size = candidates(args.model, device)
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for batch in (int(b) for b in args.batches.split(",")):
            ms = measure(models, size, batch, device, args.repeat)
            rows.append({"threads": threads, "batch": batch, "ms": {k: round(v, 2) for k, v in ms.items()}})
    load_end = os.getloadavg()[0]
    info = machine()
    names = list(models)
    lines = [
        f"# Predict paths, {args.model}, {device.type}",
        "",
        f"Machine: {info['cpu']}, {info['cpu_count']} cores, torch {info['torch']}; revision {git_revision()}; "
        f"load average {load_start:.1f} at the start, {load_end:.1f} at the end (the machine is shared: "
        "compare the ratios within one row, not figures across runs). Median ms per forward of "
        f"{args.repeat} interleaved rounds; in brackets, the ratio to `as trained`.",
        "",
        "| threads | batch | " + " | ".join(names) + " |",
        "|---:|---:|" + "---:|" * len(names),
    ]
    for row in rows:
        base = row["ms"]["as trained"]
        cells = [f"{row['ms'][n]:.1f} ({row['ms'][n] / base:.2f}×)" for n in names]
        lines.append(f"| {row['threads']} | {row['batch']} | " + " | ".join(cells) + " |")
    lines += ["", "Memory each copy added when built (process RSS): "
              + ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in memory.items()) + ".", ""]
    payload = {"model": args.model, "device": device.type, "machine": info, "revision": git_revision(),
               "load_average": [load_start, load_end], "repeat": args.repeat, "rows": rows,
               "memory_bytes": memory}
    write_results(args.out, f"predict-{device.type}", payload, "\n".join(lines))


if __name__ == "__main__":
    main()
