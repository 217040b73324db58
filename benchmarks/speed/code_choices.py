"""The figures behind the code's micro-choices: each choice against the alternative it replaced, same values.

Several engine and service functions do something less obvious than the textbook call because the obvious
one is slower on the CPU; their docstrings give the reason and cite the table this script writes instead of
carrying numbers of one machine. Each row times the choice and its alternative in one process, alternated,
on the data the server meets (the embedded EfficientNet-Lite0 prepared as served, a sample photo, one torch
thread: a worker's share with the default two workers on two cores), and checks that both give the same
values, which is what lets the faster one stand in:

- ``engine/threshold.py`` host select against ``torch.kthvalue`` (the per-sample threshold over every neuron);
- ``engine/reduce.py`` ``max_abs`` as a running comparison against ``gather(argmax(|maps|))``;
- ``engine/pathways.py`` ``kept_per_site``: NumPy's ``count_nonzero`` on row slices against torch's on the
  strided ``[B, n]`` site views and against a bool ``sum``;
- ``engine/pathways.py`` ``run_along``: the mask multiplied as ``uint8`` against as ``bool``, ``masked_fill_``
  and ``where``, at the largest activation site (channels-last);
- ``imaging.py`` ``PNG_COMPRESS_LEVEL`` = 1 against Pillow's default 6: time and size of a heatmap and an
  overlay.

Run: ``.venv/bin/python benchmarks/speed/code_choices.py`` (about a minute); writes
``benchmarks/speed/results/code-choices-<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.common import git_revision, machine, time_call, write_results  # noqa: E402
from handler.engine import SELECTIONS, explaining, instrument  # noqa: E402
from handler.engine.contribution import _abs_contribution, score_neurons  # noqa: E402
from handler.engine.reduce import max_abs  # noqa: E402
from handler.engine.threshold import keep_above_quantile, removal_count  # noqa: E402
from handler.imaging import (PNG_COMPRESS_LEVEL, VisualizationSettings, open_image, render_heatmap,  # noqa: E402
                             render_overlay)
from handler.models import load_model  # noqa: E402
from handler.samples import sample_photo  # noqa: E402
from handler.service import ExplanationService  # noqa: E402

SPARSITY = 0.7


def _timed(cases: dict, repeat: int) -> dict:
    """Median milliseconds of each case, the cases' rounds alternated so that drift hits them alike."""
    samples: dict = {name: [] for name in cases}
    for _ in range(repeat):
        for name, fn in cases.items():
            samples[name].append(time_call(fn, torch.device("cpu"), warmup=1, repeat=3)["median_s"] * 1e3)
    return {name: float(np.median(values)) for name, values in samples.items()}


def _row(where: str, choice: str, timings: dict, same: bool, unit: str = "ms") -> dict:
    chosen = timings[choice]
    return {"where": where, "choice": choice, "timings_ms": timings, "same_values": same,
            "alternatives": {name: t / chosen for name, t in timings.items() if name != choice}, "unit": unit}


def threshold_row(scores: torch.Tensor, repeat: int) -> dict:
    k = removal_count(SPARSITY, scores.shape[1])

    def by_kthvalue():
        tau = scores.kthvalue(k, dim=1).values
        return scores > tau[:, None]

    same = torch.equal(keep_above_quantile(scores, [SPARSITY]), by_kthvalue())
    timings = _timed({"host select": lambda: keep_above_quantile(scores, [SPARSITY]),
                      "torch.kthvalue + compare": by_kthvalue}, repeat)
    return _row(f"engine/threshold.py keep_above_quantile ({scores.shape[1]:,} neurons)", "host select", timings, same)


def reduce_row(maps: torch.Tensor, repeat: int) -> dict:
    def by_gather():
        index = maps.abs().argmax(dim=1, keepdim=True)
        return maps.gather(1, index).squeeze(1)

    same = torch.equal(max_abs(maps), by_gather())
    timings = _timed({"running comparison": lambda: max_abs(maps), "gather(argmax(|maps|))": by_gather}, repeat)
    return _row(f"engine/reduce.py max_abs ({list(maps.shape)})", "running comparison", timings, same)


def count_row(pathway, repeat: int) -> dict:
    layout, keep = pathway.layout, pathway.keep

    def torch_count():
        return torch.stack([torch.count_nonzero(site.view(keep).flatten(1), dim=1) for site in layout], 1)

    def bool_sum():
        return torch.stack([site.view(keep).flatten(1).sum(dim=1) for site in layout], 1)

    chosen = pathway.kept_per_site()
    same = torch.equal(chosen, torch_count()) and torch.equal(chosen, bool_sum())
    timings = _timed({"numpy count_nonzero on row slices": pathway.kept_per_site,
                      "torch count_nonzero on site views": torch_count, "bool sum": bool_sum}, repeat)
    return _row(f"engine/pathways.py kept_per_site ({len(layout.sites)} sites)", "numpy count_nonzero on row slices",
                timings, same)


def mask_row(activation: torch.Tensor, kept: torch.Tensor, repeat: int) -> dict:
    """The in-place mask of ``run_along`` on a copy of one site's input (channels-last, as the prepared model's)."""
    work = activation.clone(memory_format=torch.channels_last)
    as_uint8 = kept.view(torch.uint8)

    def fresh(fn):
        def run():
            work.copy_(activation)
            fn()
        return run

    def reference(fn):
        work.copy_(activation)
        fn()
        return work.clone()

    cases = {
        "uint8 mul_": lambda: work.mul_(as_uint8),
        "bool mul_": lambda: work.mul_(kept),
        "masked_fill_(~keep, 0)": lambda: work.masked_fill_(~kept, 0),
        "where(keep, a, 0)": lambda: work.copy_(torch.where(kept, work, 0.0)),
    }
    results = {name: reference(fn) for name, fn in cases.items()}
    # masked_fill_ and where write +0 where a negative input times 0 gives -0: compare values, then signs
    same = all(torch.equal(results["uint8 mul_"], r) for r in results.values())
    timings = _timed({name: fresh(fn) for name, fn in cases.items()} | {"copy alone": fresh(lambda: None)}, repeat)
    copy = timings.pop("copy alone")
    timings = {name: max(t - copy, 0.0) for name, t in timings.items()}
    row = _row(f"engine/pathways.py run_along mask ({list(activation.shape)}, channels-last)", "uint8 mul_",
               timings, same)
    row["same_bits"] = {name: bool(torch.equal(results["uint8 mul_"].view(torch.int32), r.view(torch.int32)))
                        for name, r in results.items()}
    return row


def png_row(service: ExplanationService, photo_path: Path, repeat: int) -> dict:
    image = open_image(photo_path)
    (result,) = service.explain_images([image], outputs="heatmap,overlay,attribution")
    settings = VisualizationSettings()
    heatmap = render_heatmap(result.attribution, settings)
    overlay = render_overlay(image.convert("RGB"), result.attribution, service.preprocessor.window(image), settings)

    def encode(picture, level):
        buffer = io.BytesIO()
        picture.save(buffer, format="PNG", compress_level=level)
        return buffer.getvalue()

    sizes, timings = {}, {}
    for name, picture in (("heatmap", heatmap), ("overlay", overlay)):
        for level in (PNG_COMPRESS_LEVEL, 6):
            sizes[f"{name} level {level}"] = len(encode(picture, level))
        timings.update({f"{name} level {level}": t for level, t in _timed(
            {level: (lambda p=picture, lv=level: encode(p, lv)) for level in (PNG_COMPRESS_LEVEL, 6)}, repeat).items()})
    same = all(np.array_equal(np.asarray(Image.open(io.BytesIO(encode(p, PNG_COMPRESS_LEVEL)))),
                              np.asarray(Image.open(io.BytesIO(encode(p, 6))))) for p in (heatmap, overlay))
    return {"where": f"imaging.py PNG_COMPRESS_LEVEL = {PNG_COMPRESS_LEVEL} against 6 ({photo_path.name})",
            "choice": f"level {PNG_COMPRESS_LEVEL}", "timings_ms": timings, "bytes": sizes, "same_values": same}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="alternated rounds per row")
    parser.add_argument("--photo", default="coffee")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "speed" / "results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_model("efficientnet_lite0", predictor=True)
    service = ExplanationService(loaded)
    photo = sample_photo(args.photo)
    x = service.preprocessor.batch([open_image(photo)])
    model = loaded.module
    with explaining(model):
        scores, *_ = score_neurons(model, x, torch.tensor([-1]), _abs_contribution)
        pathway = SELECTIONS.get("contribution")(model, x, torch.tensor([-1]), [SPARSITY])
        captured = {}
        largest = max(pathway.layout, key=lambda site: site.numel)

        def capture(call):
            if call.site.index == largest.index:
                captured["input"] = call.input.detach().clone(memory_format=torch.channels_last)
            return call.run()

        with torch.no_grad(), instrument(model, capture, inputs=x):
            model(x)
    maps = {b: torch.randn(b, 3, 224, 224, generator=torch.Generator().manual_seed(b)) for b in (1, 8)}
    rows = [
        threshold_row(scores, args.repeat),
        reduce_row(maps[1], args.repeat),
        reduce_row(maps[8], args.repeat),
        count_row(pathway, args.repeat),
        mask_row(captured["input"], largest.view(pathway.keep)[:1], args.repeat),
        png_row(service, photo, args.repeat),
    ]
    payload = {"revision": git_revision(), "machine": machine(), "photo": photo.name, "rows": rows}
    write_results(args.out, "code-choices-cpu", payload, _markdown(payload))


def _markdown(payload: dict) -> str:
    m = payload["machine"]
    lines = [
        "# The code's micro-choices against their alternatives",
        "",
        f"Revision {payload['revision']}; {m['cpu']}, {m['cpu_count']} cores, one torch thread; torch {m['torch']}.",
        "EfficientNet-Lite0 prepared as served, the sample photo "
        f"`{payload['photo']}`; medians of alternated rounds (`benchmarks/speed/code_choices.py`).",
        "",
        "| where | choice | alternative | ms (choice → alternative) | alternative / choice | same values |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in payload["rows"]:
        if "bytes" in row:
            continue
        t = row["timings_ms"]
        for name, ratio in row["alternatives"].items():
            same = row["same_values"] if "same_bits" not in row else (
                "values yes; bits " + ("yes" if row["same_bits"][name] else "no (signs of zeros)"))
            lines.append(f"| {row['where']} | {row['choice']} | {name} | {t[row['choice']]:.2f} → {t[name]:.2f} "
                         f"| {ratio:.1f}× | {'yes' if same is True else ('no' if same is False else same)} |")
    png = next(r for r in payload["rows"] if "bytes" in r)
    lines += ["", f"PNG encoding ({png['where']}); decoded pixels equal: {'yes' if png['same_values'] else 'no'}", "",
              "| image | level | ms | bytes |", "| --- | --- | --- | --- |"]
    for key, ms in png["timings_ms"].items():
        image, _, level = key.partition(" level ")
        lines.append(f"| {image} | {level} | {ms:.2f} | {png['bytes'][key]:,} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
