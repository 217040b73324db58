"""``pathway-explain``: explain image files offline, writing the server's JSON document and PNGs per image.

Exit status: 0 when every image was explained, 1 when some could not be (each
is named on stderr, the others are still written), 2 for a usage error (bad
option, unknown model, weights or class names that do not fit the architecture)
before any work, 3 for an unexpected internal error. Every failure is one line
on stderr (``PATHWAY_DEBUG=1`` adds the traceback of an internal error).

Each image's outputs are ``STEM.json``, ``STEM.heatmap.png``, ``STEM.overlay.png``
and, with ``--save-attribution``, ``STEM.attribution.npy``. With several targets
(``--target A,B,...`` or ``--explain-top-k K``) the PNGs and the array are per
target, ``STEM.<class index>.heatmap.png`` and so on, beside one ``STEM.json``
whose ``explanations`` list names them. Each document carries a ``provenance``
record; ``--verify DOC.json IMAGE`` recomputes the explanation it describes and
exits 0 with one line when it matches, 1 with one line saying what differs when
it does not (2: the document cannot be read). A run first removes these files of
every stem it is given (the per-target ones too), so ``--out`` never holds a file
from an earlier run beside the new ones (an image that fails leaves none).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .commands import parse_device, run_main
from .engine import METHODS, REDUCTIONS, SELECTIONS
from .errors import ExplainError, InvalidOption, UsageError
from .imaging import COLORMAPS, OVERLAY_TYPES, POLARITIES, VISUALIZATION_OPTIONS
from .models import ModelLoadError, builtin_names, get_spec, label_aliases, load_labels, spec_for_architecture
from .schema import Limits, parse_options, path_outputs
from .service import ExplanationService

PROG = "pathway-explain"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2) instead of the usage text and the error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG,
        description="Explain an image classifier's predictions with critical pathways and pathway gradient "
                    "(Khakzar et al., CVPR 2021). Writes STEM.json, STEM.heatmap.png and STEM.overlay.png "
                    "per image into --out.")
    p.add_argument("images", nargs="*", metavar="IMAGE", help="image files (JPEG, PNG, WebP, BMP, GIF, TIFF, AVIF)")
    p.add_argument("--out", type=Path, help="output directory (created if missing)")
    model = p.add_argument_group("model")
    model.add_argument("--model", default=None,
                       help=f"built-in model ({', '.join(builtin_names())}) or a model spec .json "
                            "(default: efficientnet_lite0)")
    model.add_argument("--arch", help="a torchvision or timm architecture name, e.g. resnet50 or timm:resnet50d")
    model.add_argument("--weights", help="with --arch: a state-dict file (loaded with weights_only=True); "
                                         "omitted: random weights")
    model.add_argument("--labels", help="with --arch: class names, one per line or a JSON list/index_to_name.json "
                                        "(default: ImageNet)")
    model.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:N")
    ex = p.add_argument_group("explanation")
    ex.add_argument("--method", default=None, help=f"one of {', '.join(METHODS.names())} (default: pathway_gradient)")
    ex.add_argument("--sparsity", default=None, help="fraction of neurons removed from the pathway, in [0, 1) "
                                                     "(default: the model's, 0.7)")
    ex.add_argument("--target", default="auto",
                    help="auto (predicted class), a class index or a label name; several, comma-separated "
                         "(A,B,...), write per-target files STEM.<index>.*")
    ex.add_argument("--explain-top-k", default=None, metavar="K",
                    help="explain the K most probable classes (per-target files STEM.<index>.*, most probable "
                         "first in STEM.json)")
    ex.add_argument("--reduce", default=None, help=f"channel reduction: {', '.join(REDUCTIONS.names())}")
    ex.add_argument("--selection", default=None, help=f"pathway selection: {', '.join(SELECTIONS.names())}")
    ex.add_argument("--top-k", default=None, help="predictions to list (default 5)")
    vis = p.add_argument_group("visualisation (heatmap and overlay; the attribution itself is unchanged)")
    vis.add_argument("--visualization", default=None,
                     help="pixels (default: each pixel coloured by its intensity) or outlines (contours around "
                          "the strongest regions, drawn over the photo)")
    vis.add_argument("--polarity", default=None, help=f"what is shown: {', '.join(POLARITIES)} (default absolute)")
    vis.add_argument("--colormap", default=None,
                     help=f"colours: {', '.join(COLORMAPS)} (default inferno; pink_green with --polarity both)")
    vis.add_argument("--clip-percent-upper", default=None, metavar="P",
                     help=f"{VISUALIZATION_OPTIONS['clip_percent_upper'].help} "
                          f"(default {VISUALIZATION_OPTIONS['clip_percent_upper'].default:g})")
    vis.add_argument("--clip-percent-lower", default=None, metavar="P",
                     help=f"{VISUALIZATION_OPTIONS['clip_percent_lower'].help} "
                          f"(default {VISUALIZATION_OPTIONS['clip_percent_lower'].default:g})")
    vis.add_argument("--overlay-type", default=None,
                     help=f"the overlay draws over: {', '.join(OVERLAY_TYPES)} (default original)")
    vis.add_argument("--smooth", default=None, metavar="SIGMA",
                     help=f"{VISUALIZATION_OPTIONS['smooth'].help} "
                          f"(default {VISUALIZATION_OPTIONS['smooth'].default:g})")
    ex.add_argument("--save-attribution", action="store_true",
                    help="also write STEM.attribution.npy (float32 [H, W] at model input resolution, signed, "
                         "max |value| = 1)")
    ex.add_argument("--option", action="append", default=[], metavar="NAME=VALUE",
                    help="a method or selection option, e.g. --option signed=true (repeatable; see --list)")
    ex.add_argument("--batch-size", type=int, default=8, help="images explained together (default 8)")
    p.add_argument("--verify", type=Path, metavar="DOC.json",
                   help="recompute the explanation a document (the server's or this tool's) describes from IMAGE "
                        "and compare: exit 0 when the weights, version, options, image and attribution all match, "
                        "1 with what differs")
    p.add_argument("--list", action="store_true", help="list models, methods, selections and reductions, and exit")
    p.add_argument("--list-labels", nargs="?", const="", default=None, metavar="MODEL",
                   help="print the class index and name of every class of MODEL (default: the --model or "
                        "--arch/--labels model, else efficientnet_lite0), one per line, and exit")
    return p


#: The files a run writes per image stem (``attribution`` only with --save-attribution).
OUTPUT_SUFFIXES = {"document": "json", "heatmap": "heatmap.png", "overlay": "overlay.png",
                   "attribution": "attribution.npy"}


def remove_stale_outputs(out: Path, stem: str) -> None:
    """Delete what an earlier run wrote for ``stem``, so a new run's files never sit beside older ones:
    ``STEM.<suffix>`` and the per-target ``STEM.<class index>.<suffix>``."""
    for suffix in OUTPUT_SUFFIXES.values():
        (out / f"{stem}.{suffix}").unlink(missing_ok=True)
    per_target = re.compile(re.escape(stem) + r"\.\d+\.(?:" + "|".join(
        re.escape(suffix) for name, suffix in OUTPUT_SUFFIXES.items() if name != "document") + ")")
    for path in out.glob(f"{glob_escape(stem)}.*"):
        if per_target.fullmatch(path.name):
            path.unlink(missing_ok=True)


def glob_escape(text: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", text)


def list_labels(spec) -> int:
    """``index<TAB>name`` per class; names that stand for several classes (see models.IMAGENET_RENAMED) after."""
    labels = load_labels(spec)
    if not labels:
        print(f"{PROG}: error: model {spec.name!r} has no class names; targets are class indices", file=sys.stderr)
        return 2
    for index, name in enumerate(labels):
        print(f"{index}\t{name}")
    for name, indices in label_aliases(labels).items():
        print(f"# {name!r} alone names classes {', '.join(map(str, indices))}: give the index or the full label")
    return 0


def _spec(args):
    if args.arch:
        if args.model:
            raise UsageError("give either --model or --arch, not both")
        if args.weights and not Path(args.weights).is_file():
            raise UsageError(f"weights file not found: {args.weights}")
        if args.labels and not Path(args.labels).is_file():
            raise UsageError(f"labels file not found: {args.labels}")
        return spec_for_architecture(args.arch, weights=args.weights, labels=args.labels or "imagenet")
    if args.weights or args.labels:
        raise UsageError("--weights and --labels go with --arch")
    return get_spec(args.model or "efficientnet_lite0")


def _stems(paths: Sequence[Path]) -> list:
    """Output names per image; repeated file names get a numeric suffix so nothing is overwritten."""
    seen: dict = {}
    out = []
    for path in paths:
        stem = path.stem
        n = seen.get(stem, 0)
        seen[stem] = n + 1
        out.append(stem if n == 0 else f"{stem}-{n + 1}")
    return out


def run(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list:
        print("models:     " + ", ".join(builtin_names()))
        print("methods:    " + ", ".join(METHODS.names()))
        print("selections: " + ", ".join(SELECTIONS.names()))
        for registry in (METHODS, SELECTIONS):
            for name in registry.names():
                for option, spec in registry.get(name).options.items():
                    print(f"  option {option} ({registry.what} {name}): {spec.type.__name__}, default "
                          f"{spec.default!r}. {spec.help}")
        print("reductions: " + ", ".join(REDUCTIONS.names()))
        print("colormaps:  " + ", ".join(COLORMAPS))
        return 0
    if args.list_labels is not None:
        try:
            if args.list_labels:
                if args.model or args.arch:
                    raise UsageError("give the model either after --list-labels or with --model/--arch")
                args.model = args.list_labels
            return list_labels(_spec(args))
        except (ExplainError, ModelLoadError, UsageError) as err:
            print(f"{PROG}: error: {err}", file=sys.stderr)
            return 2
    if args.verify is not None:
        if len(args.images) != 1:
            parser.error("--verify DOC.json takes exactly one IMAGE: the one the document was made from")
        return verify(args)
    if not args.images:
        parser.error("no images given")
    if args.out is None:
        parser.error("--out DIR is required")
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.out.exists() and not args.out.is_dir():
        parser.error(f"--out {args.out} exists and is not a directory")

    outputs = ["heatmap", "overlay", "pathway"] + (["attribution"] if args.save_attribution else [])
    several = "," in args.target
    default_target = args.target == "auto" and args.explain_top_k is not None
    raw = {"method": args.method, "target": None if several or default_target else args.target,
           "targets": args.target if several else None, "explain_top_k": args.explain_top_k,
           "sparsity": args.sparsity, "reduce": args.reduce, "selection": args.selection, "top_k": args.top_k,
           "outputs": outputs, **{name: getattr(args, name) for name in VISUALIZATION_OPTIONS}}
    raw = {k: v for k, v in raw.items() if v is not None}
    for item in args.option:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            parser.error(f"--option takes NAME=VALUE, not {item!r}")
        if name.strip().replace("-", "_") in set(raw) | set(VISUALIZATION_OPTIONS) | {"targets", "target"}:
            parser.error(f"--option {name.strip()} has its own flag; use --{name.strip().replace('_', '-')}")
        raw[name.strip()] = value
    try:
        options = parse_options(raw, Limits())
        device = parse_device(args.device)
        service = ExplanationService.from_spec(_spec(args), device=device)
        # Validate what does not depend on the image (targets included) before reading any file.
        service.validate([raw], explain=True)
    except (ExplainError, ModelLoadError, UsageError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2

    paths = [Path(p) for p in args.images]
    stems = _stems(paths)
    failures = 0
    decoded = []
    for path, stem in zip(paths, stems):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            print(f"{PROG}: error: {path}: no such file", file=sys.stderr)
            failures += 1
            continue
        except (IsADirectoryError, PermissionError) as err:
            print(f"{PROG}: error: {path}: cannot read: {err.strerror}", file=sys.stderr)
            failures += 1
            continue
        if not data:
            print(f"{PROG}: error: {path}: the file is empty", file=sys.stderr)
            failures += 1
            continue
        try:
            decoded.append((path, stem, service.decode(data)))
        except ExplainError as err:
            print(f"{PROG}: error: {path}: {err}", file=sys.stderr)
            failures += 1

    try:
        args.out.mkdir(parents=True, exist_ok=True)
        for stem in stems:
            remove_stale_outputs(args.out, stem)
    except OSError as err:
        print(f"{PROG}: error: cannot write to {args.out}: {err.strerror or err}", file=sys.stderr)
        return 1
    for start in range(0, len(decoded), args.batch_size):
        chunk = decoded[start:start + args.batch_size]
        try:
            results = service.explain([image for _, _, image in chunk], [options] * len(chunk),
                                      attribution_dtype=np.float32)
        except Exception as err:  # noqa: BLE001 - one line per image, never a traceback
            results = [err] * len(chunk)
        for (path, stem, _), result in zip(chunk, results):
            if isinstance(result, InvalidOption):  # found only while running (Grad-CAM's layer): every image's
                print(f"{PROG}: error: {result}", file=sys.stderr)
                return 2
            if isinstance(result, BaseException):
                print(f"{PROG}: error: {path}: {_one_line(result)}", file=sys.stderr)
                failures += 1
                continue
            files, bodies = {}, []
            for part in result.targets:  # per-target names only when the document has an explanations list
                body = part.document["explanation"]
                prefix = f"{stem}.{body['target']['index']}" if result.parts else stem
                written = {name: f"{prefix}.{OUTPUT_SUFFIXES[name]}" for name in part.artifacts}
                files.update({written[name]: data for name, data in part.artifacts.items()})
                bodies.append(path_outputs(body, written))
            document = dict(result.document)
            if result.parts:
                document["explanations"] = bodies
            else:
                document["explanation"] = bodies[0]
            document["source"] = str(path)
            files[f"{stem}.{OUTPUT_SUFFIXES['document']}"] = (json.dumps(document, indent=2) + "\n").encode()
            try:
                for name, data in files.items():
                    (args.out / name).write_bytes(data)
            except OSError as err:
                for name in files:  # an image that fails leaves no files: none half-written, none of this run
                    (args.out / name).unlink(missing_ok=True)
                print(f"{PROG}: error: {path}: cannot write its outputs: {err.strerror or err}", file=sys.stderr)
                failures += 1
                continue
            top = document["predictions"][0]
            explained = ", ".join(body["target"]["label"] for body in bodies)
            print(f"{path}: predicted {top['label']} ({top['probability']:.3f}); explained "
                  f"{explained} -> {args.out / stem}.*")
    return 1 if failures else 0


def _one_line(err: BaseException) -> str:
    """An error as one line: its message, prefixed with its type where that is not one of ours."""
    text = " ".join(str(err).split()) or "no details"
    return text if isinstance(err, ExplainError) else f"{type(err).__name__}: {text}"


def verify(args) -> int:
    """``--verify DOC.json IMAGE``: one line on stdout (exit 0) or stderr (exit 1); 2 when nothing can be checked."""
    image = Path(args.images[0])
    try:
        document = json.loads(args.verify.read_text())
        data = image.read_bytes()
    except FileNotFoundError as err:
        print(f"{PROG}: error: {err.filename}: no such file", file=sys.stderr)
        return 2
    except (OSError, UnicodeDecodeError) as err:
        print(f"{PROG}: error: cannot read {args.verify} or {image}: {err}", file=sys.stderr)
        return 2
    except json.JSONDecodeError as err:
        print(f"{PROG}: error: {args.verify} is not JSON: {err}", file=sys.stderr)
        return 2
    record = document.get("provenance") if isinstance(document, dict) else None
    if not isinstance(record, dict):
        print(f"{PROG}: error: {args.verify} has no provenance record to verify", file=sys.stderr)
        return 2
    try:
        if not (args.model or args.arch):  # the document's model, unless told otherwise
            args.model = record.get("model") or None
        service = ExplanationService.from_spec(_spec(args), device=parse_device(args.device))
    except (ExplainError, ModelLoadError, UsageError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    result = service.verify(document, data)
    if result.ok:
        print(f"{args.verify}: {result.message}")
        return 0
    print(f"{PROG}: {args.verify} does not match {image}: {result.message}", file=sys.stderr)
    return 1


def main(argv: Optional[Sequence[str]] = None) -> None:
    run_main(run, argv, prog=PROG)


if __name__ == "__main__":
    main()
