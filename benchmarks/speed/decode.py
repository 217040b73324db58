"""Large JPEG uploads: decoding at a reduced scale (the spec's ``jpeg_draft``) against the full decode.

A phone photo is a JPEG of about 12 megapixels; the model sees a 224-pixel crop of it. With ``jpeg_draft`` (the
default) the service asks libjpeg for the smallest of its scales (1/2, 1/4, 1/8) that keeps the shorter
side at least four times the spec's resize, then resizes as usual (``handler.imaging.decode_image``). This
measures, on the five sample photos enlarged to 4032 pixels on the long side (bicubic, plus a grain of
a few grey levels so the JPEG is as dense as a photo's) and saved as JPEG at quality 92:

- time per image, in process, at one torch thread (a worker's share with the default two workers on two
  cores): decoding, decoding + preprocessing, and a whole prediction (what ``/predictions`` runs after
  the HTTP layer), reduced against full;
- the prediction: same top class, and the summed difference of all class probabilities, with the same
  between two encodings of the photo (quality 92 and 95, both decoded in full) for scale;
- the default explanation map (pathway gradient): Pearson of the reduced decode's map with the full
  decode's, raw and as displayed (``display_values``: smoothed, ranked); for scale, the same between the
  full decodes of the photo saved at quality 92 and at quality 95, two encodings of one photo.

Run: ``.venv/bin/python benchmarks/speed/decode.py`` (about a minute on 2 CPU cores); writes
``benchmarks/speed/results/decode-<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from benchmarks.common import git_revision, machine, time_call, write_results  # noqa: E402
from handler import ExplanationService  # noqa: E402
from handler.imaging import display_values  # noqa: E402
from handler.models import get_spec  # noqa: E402
from handler.samples import SAMPLE_PHOTOS, sample_photo  # noqa: E402
from handler.service import cpu_threads  # noqa: E402

LONG_SIDE = 4032


def phone_sized(name: str, quality: int) -> bytes:
    photo = Image.open(sample_photo(name)).convert("RGB")
    scale = LONG_SIDE / max(photo.size)
    big = photo.resize((round(photo.width * scale), round(photo.height * scale)), Image.BICUBIC)
    grain = np.random.default_rng(0).integers(-4, 5, (big.height, big.width, 3))
    big = Image.fromarray(np.clip(np.asarray(big, dtype=np.int16) + grain, 0, 255).astype(np.uint8), "RGB")
    buffer = io.BytesIO()
    big.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def median_ms(fn, repeat: int) -> float:
    return 1000 * time_call(fn, torch.device("cpu"), warmup=1, repeat=repeat)["median_s"]


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=7, help="timed calls per measurement (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: a worker's share)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "speed" / "results")
    args = parser.parse_args()

    spec = get_spec("efficientnet_lite0")
    reduced = ExplanationService.from_spec(spec, device="cpu")
    full = ExplanationService.from_spec(
        dataclasses.replace(spec, preprocessing=dataclasses.replace(spec.preprocessing, jpeg_draft=False)),
        device="cpu")
    options = reduced.validate([{}], explain=False)[0].options
    rows = []
    with cpu_threads(args.threads):
        for name in SAMPLE_PHOTOS:
            data = phone_sized(name, 92)
            other_encoding = phone_sized(name, 95)
            row = {"photo": name, "jpeg_bytes": len(data)}
            images = {}
            for label, service in (("reduced", reduced), ("full", full)):
                image = service.decode(data)
                images[label] = image
                row[f"{label}_decoded_size"] = list(image.size)
                row[f"{label}_decode_ms"] = median_ms(lambda s=service: s.decode(data), args.repeat)
                row[f"{label}_decode_preprocess_ms"] = median_ms(
                    lambda s=service: s.preprocessor.batch([s.decode(data)]), args.repeat)
                row[f"{label}_prediction_ms"] = median_ms(
                    lambda s=service: s.predict([s.decode(data)], [options]), args.repeat)
            row["full_size"] = list(images["full"].size)
            explained = {label: service.explain_images([data])[0] for label, service in
                         (("reduced", reduced), ("full", full))}
            [other] = full.explain_images([other_encoding])
            with torch.no_grad():
                probabilities = {label: service.probabilities(service.preprocessor.batch([image]))[0].numpy()
                                 for label, service, image in (("reduced", reduced, images["reduced"]),
                                                               ("full", full, images["full"]),
                                                               ("other", full, full.decode(other_encoding)))}
            row["probability_l1"] = float(np.abs(probabilities["reduced"] - probabilities["full"]).sum())
            row["other_encoding_probability_l1"] = float(np.abs(probabilities["other"] - probabilities["full"]).sum())
            row["other_encoding_same_top"] = int(probabilities["other"].argmax()) == int(probabilities["full"].argmax())
            top = {label: result.document["predictions"][0] for label, result in explained.items()}
            row["top_class"] = top["full"]["label"]
            row["same_top"] = top["reduced"]["index"] == top["full"]["index"]
            row["probability_difference"] = abs(top["reduced"]["probability"] - top["full"]["probability"])
            maps = {label: result.attribution for label, result in explained.items()}
            row["map_pearson"] = pearson(maps["reduced"], maps["full"])
            row["map_pearson_displayed"] = pearson(display_values(maps["reduced"]), display_values(maps["full"]))
            row["other_encoding_pearson"] = pearson(other.attribution, maps["full"])
            row["other_encoding_pearson_displayed"] = pearson(display_values(other.attribution),
                                                              display_values(maps["full"]))
            rows.append(row)
            print(f"{name}: decode {row['full_decode_ms']:.0f} -> {row['reduced_decode_ms']:.0f} ms, prediction "
                  f"{row['full_prediction_ms']:.0f} -> {row['reduced_prediction_ms']:.0f} ms, map Pearson "
                  f"{row['map_pearson']:.3f} (another encoding: {row['other_encoding_pearson']:.3f})", flush=True)

    info = machine()
    device = "cpu"

    def ratio(key: str) -> str:
        values = [r[f"reduced_{key}"] / r[f"full_{key}"] for r in rows]
        return f"{min(values):.2f}–{max(values):.2f}×"

    lines = [
        "# Large JPEG uploads: reduced-scale decoding against the full decode (cpu)",
        "",
        f"Machine: {info['cpu']}; {info['cpu_count']} CPU cores, torch {info['torch']} at {args.threads} "
        f"thread(s); revision {git_revision()}. EfficientNet-Lite0 (resize 256, crop 224): a JPEG is decoded at "
        f"a reduced scale when its shorter side is at least {2 * reduced.preprocessor.least_decoded_side} pixels, "
        f"to a shorter side of at least {reduced.preprocessor.least_decoded_side}. Photos: the five sample photos "
        "enlarged "
        f"to {LONG_SIDE} pixels on the long side, saved as JPEG at quality 92. Times: median of {args.repeat} "
        "calls, in process.",
        "",
        "| photo | full size | decoded at | decode, ms (full → reduced) | decode + preprocess, ms | prediction, ms "
        "| same top class | Σ\\|Δp\\| (another encoding) | map Pearson, raw / displayed "
        "| another encoding, raw / displayed |",
        "|---|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['photo']} | {r['full_size'][0]}×{r['full_size'][1]} | "
            f"{r['reduced_decoded_size'][0]}×{r['reduced_decoded_size'][1]} | "
            f"{r['full_decode_ms']:.0f} → {r['reduced_decode_ms']:.0f} | "
            f"{r['full_decode_preprocess_ms']:.0f} → {r['reduced_decode_preprocess_ms']:.0f} | "
            f"{r['full_prediction_ms']:.0f} → {r['reduced_prediction_ms']:.0f} | "
            f"{'yes' if r['same_top'] else 'NO'} ({r['top_class']}; another encoding: "
            f"{'yes' if r['other_encoding_same_top'] else 'NO'}) | "
            f"{r['probability_l1']:.3f} ({r['other_encoding_probability_l1']:.3f}) | "
            f"{r['map_pearson']:.3f} / {r['map_pearson_displayed']:.3f} | "
            f"{r['other_encoding_pearson']:.3f} / {r['other_encoding_pearson_displayed']:.3f} |")
    lines += [
        "",
        f"Reduced over full, per photo: decoding {ratio('decode_ms')}, decoding + preprocessing "
        f"{ratio('decode_preprocess_ms')}, a whole prediction {ratio('prediction_ms')}.",
        "",
        "Σ|Δp|: the summed absolute difference of the 1000 class probabilities, reduced against full decode; in "
        "brackets the same between the full decodes of the photo at quality 95 and 92. "
        "Map Pearson: the reduced decode's pathway-gradient map against the full decode's; *another encoding*: "
        "the full decode of the same photo saved at quality 95 against quality 92. A gradient map follows the "
        "exact pixels (the neuron threshold and the activation pattern move with sub-grey-level changes), so "
        "both comparisons are far from 1 although the photo and the prediction are the same. The document records "
        "`jpeg_draft` and the `decoded_size`, and `verify` recomputes with the same decoding.",
    ]
    write_results(args.out, f"decode-{device}", {"machine": info, "revision": git_revision(),
                                                  "threads": args.threads, "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
